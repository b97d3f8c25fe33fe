"""The shared primitives against their diffusers counterparts."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.resnet import Downsample2D as TorchDown, ResnetBlock2D as TorchResnet, Upsample2D as TorchUp
from flax import nnx

from esd_jax.models import layers
from esd_jax.models.state_dict import abstract, load_state_dict, state_dict
from tests.reference import assert_same_names, load_from_torch, nchw, nhwc, randomize, rel_err


def _x(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('cin,cout,temb', [(16, 32, 12), (32, 32, 12), (16, 16, None)])
def test_resnet_block(cin, cout, temb):
  ref = randomize(TorchResnet(in_channels=cin, out_channels=cout, temb_channels=temb, groups=4, eps=1e-5))
  ours = layers.ResnetBlock2D(cin, cout, temb_channels=temb, groups=4, eps=1e-5, rngs=nnx.Rngs(0))
  assert_same_names(ours, ref)
  load_from_torch(ours, ref)
  x, t = _x((2, 8, 6, cin)), _x((2, temb or 1), 1)
  want = ref(torch.from_numpy(nchw(x)), torch.from_numpy(t) if temb else None)
  assert rel_err(ours(x, t if temb else None), nhwc(want)) < 1e-5


@pytest.mark.parametrize('cross', [None, 24])
def test_attention(cross):
  ref = randomize(TorchAttention(32, cross_attention_dim=cross, heads=4, dim_head=8))
  ours = layers.Attention(32, cross_attention_dim=cross, heads=4, dim_head=8, rngs=nnx.Rngs(0))
  assert_same_names(ours, ref)
  load_from_torch(ours, ref)
  x, c = _x((2, 10, 32)), _x((2, 7, cross or 32), 1)
  want = ref(torch.from_numpy(x), torch.from_numpy(c) if cross else None)
  assert rel_err(ours(x, c if cross else None), want) < 1e-5


def test_vae_spatial_attention():
  ref = randomize(TorchAttention(32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True, bias=True,
                                 upcast_softmax=True, eps=1e-6, _from_deprecated_attn_block=True))
  ours = layers.Attention(32, heads=1, dim_head=32, norm_num_groups=8, eps=1e-6, bias=True,
                          residual_connection=True, rngs=nnx.Rngs(0))
  assert_same_names(ours, ref)
  load_from_torch(ours, ref)
  x = _x((2, 5, 4, 32))
  assert rel_err(ours(x), nhwc(ref(torch.from_numpy(nchw(x))))) < 1e-5


@pytest.mark.parametrize('padding', [0, 1])
@pytest.mark.parametrize('size', [(8, 8), (7, 5)])
def test_downsample(padding, size):
  ref = randomize(TorchDown(16, use_conv=True, out_channels=24, padding=padding, name='op'))
  ours = layers.Downsample2D(16, 24, padding=padding, rngs=nnx.Rngs(0))
  assert_same_names(ours, ref)
  load_from_torch(ours, ref)
  x = _x((1, *size, 16))
  assert rel_err(ours(x), nhwc(ref(torch.from_numpy(nchw(x))))) < 1e-5


@pytest.mark.parametrize('output_size', [None, (9, 7)])
def test_upsample(output_size):
  ref = randomize(TorchUp(16, use_conv=True, out_channels=8))
  ours = layers.Upsample2D(16, 8, rngs=nnx.Rngs(0))
  load_from_torch(ours, ref)
  x = _x((1, 5, 4, 16))
  want = ref(torch.from_numpy(nchw(x)), output_size=output_size)
  assert rel_err(ours(x, output_size), nhwc(want)) < 1e-5


def test_norms_and_activations():
  x = _x((2, 6, 16)) * 3 + 1
  ln = torch.nn.LayerNorm(16, eps=1e-5)
  ours = layers.LayerNorm(16, eps=1e-5)
  assert rel_err(ours(x), ln(torch.from_numpy(x))) < 1e-6
  for name, ref in [('silu', torch.nn.functional.silu), ('gelu', torch.nn.functional.gelu),
                    ('quick_gelu', lambda t: t * torch.sigmoid(1.702 * t))]:
    assert rel_err(layers.activation(name)(x), ref(torch.from_numpy(x))) < 1e-6
  with pytest.raises(ValueError, match='Unsupported activation'):
    layers.activation('relu6')


def test_bf16_compute_keeps_fp32_params():
  block = layers.ResnetBlock2D(16, 32, temb_channels=8, groups=4, rngs=nnx.Rngs(0))
  y = block(_x((1, 4, 4, 16)).astype(np.float32).astype('bfloat16'), _x((1, 8)).astype('bfloat16'))
  assert y.dtype == np.dtype('bfloat16')
  assert all(v.dtype == np.float32 for v in state_dict(block).values())


def test_load_state_dict_errors_and_abstract_build():
  block = abstract(lambda: layers.ResnetBlock2D(16, 32, temb_channels=8, groups=4, rngs=nnx.Rngs(0)))
  full = state_dict(layers.ResnetBlock2D(16, 32, temb_channels=8, groups=4, rngs=nnx.Rngs(1)))
  with pytest.raises(KeyError, match='Missing: conv1.bias'):
    load_state_dict(block, {k: v for k, v in full.items() if k != 'conv1.bias'}, source='x.safetensors')
  with pytest.raises(KeyError, match='Unexpected: extra'):
    load_state_dict(block, {**full, 'extra': np.zeros(1)}, source='x.safetensors')
  with pytest.raises(ValueError, match=r"x.safetensors: tensor 'conv1.weight' has shape \(32, 16, 3, 1\)"):
    load_state_dict(block, {**full, 'conv1.weight': np.zeros((32, 16, 3, 1))}, source='x.safetensors')
  load_state_dict(block, {k: (lambda v=v: np.asarray(v)) for k, v in full.items()})
  got = state_dict(block)
  assert all(np.array_equal(got[k], full[k]) for k in full)


def test_convolution_kernels_are_held_hwio_and_stored_oihw():
  # Held in the layout XLA convolves with; every file-facing view (state_dict, param_shapes, load_state_dict) is
  # PyTorch's, so a round trip through torch is exact and the torch module computes what ours does.
  from esd_jax.models.state_dict import held, param_shapes, split_flat, stored
  torch_conv = randomize(torch.nn.Conv2d(3, 5, 3, padding=1), seed=2)
  ours = load_from_torch(abstract(lambda: layers.Conv2d(3, 5, 3, padding=1, rngs=nnx.Rngs(0))), torch_conv)
  assert split_flat(ours)[1]['weight'].shape == (3, 3, 3, 5) and param_shapes(ours)['weight'] == (5, 3, 3, 3)
  assert np.array_equal(state_dict(ours)['weight'], torch_conv.weight.numpy())
  x = _x((2, 6, 6, 3))
  assert rel_err(ours(x), nhwc(torch_conv(torch.from_numpy(nchw(x))))) <= 1e-5
  # Stacked (separate models: a leading model axis) and not; other ranks untouched.
  kernels = np.arange(2 * 5 * 3 * 3 * 3, dtype=np.float32).reshape(2, 5, 3, 3, 3)
  assert np.array_equal(stored(held(kernels, stacked=1), stacked=1), kernels)
  assert np.array_equal(stored(held(kernels[0]))[None], kernels[:1])
  assert stored(np.zeros((5, 3))).shape == (5, 3) and stored(np.zeros((2, 5, 3)), stacked=1).shape == (2, 5, 3)
