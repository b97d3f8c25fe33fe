"""The Flax UNet2DConditionModel against diffusers: numerical parity on small random models of each SD
family, and the exact parameter structure of the full-size SD 1.4, SD 2.1 and SDXL UNets."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from esd_jax.models.config import ModelConfigError
from esd_jax.models.state_dict import param_shapes
from esd_jax.models.unet import UNet2DConditionModel
from tests.reference import assert_same_names, load_from_torch, nchw, nhwc, randomize, rel_err

REFERENCE_CONFIGS = Path(__file__).resolve().parents[1] / 'esd_jax' / 'models' / 'reference_configs'

_TINY = dict(norm_num_groups=8, block_out_channels=[32, 64], layers_per_block=1)
_SD1 = dict(down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
            up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'])
_XL = dict(down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D'],
           up_block_types=['CrossAttnUpBlock2D', 'UpBlock2D'], use_linear_projection=True,
           addition_embed_type='text_time', upcast_attention=None)

# (name, diffusers config, latent (H, W), timesteps, pooled text width for SDXL's text_time embedding)
CASES = [
    # SD 1.x: 1×1 conv projections, one head count for every block.
    ('sd1-basic', {**_TINY, **_SD1, 'attention_head_dim': 8, 'cross_attention_dim': 24}, (8, 8), 10, None),
    ('sd1-odd-latent', {**_TINY, 'block_out_channels': [32, 32, 64], 'attention_head_dim': 4,
                        'down_block_types': ['CrossAttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
                        'up_block_types': ['UpBlock2D', 'UpBlock2D', 'CrossAttnUpBlock2D'],
                        'cross_attention_dim': 16, 'center_input_sample': True, 'flip_sin_to_cos': False,
                        'freq_shift': 1}, (9, 7), [3, 999], None),
    ('sd1-time-options', {**_TINY, **_SD1, 'attention_head_dim': 2, 'cross_attention_dim': 24,
                          'downsample_padding': 0, 'act_fn': 'gelu', 'mid_block_scale_factor': 1.5,
                          'time_embedding_dim': 96, 'time_embedding_act_fn': 'silu',
                          'timestep_post_act': 'silu'}, (8, 8), 437.5, None),
    # SD 2.x: linear projections, per-block head counts, upcast attention, wider text embeddings.
    ('sd2-basic', {**_TINY, **_SD1, 'attention_head_dim': [2, 4], 'use_linear_projection': True,
                   'upcast_attention': True, 'cross_attention_dim': 48}, (8, 8), 500, None),
    ('sd2-odd-latent', {**_TINY, **_SD1, 'attention_head_dim': [8, 2], 'use_linear_projection': True,
                        'upcast_attention': True, 'cross_attention_dim': 40}, (11, 6), [1.0, 250.0], None),
    ('sd2-per-block-lists', {**_TINY, **_SD1, 'layers_per_block': [1, 2],
                             'attention_head_dim': [4, 2], 'cross_attention_dim': 32,
                             'transformer_layers_per_block': 2, 'use_linear_projection': True,
                             'upcast_attention': True}, (8, 8), 999, None),
    # SDXL: DownBlock2D first, deeper transformers in lower blocks, text_time added embedding.
    ('sdxl-basic', {**_TINY, **_XL, 'attention_head_dim': [2, 4], 'transformer_layers_per_block': [1, 2],
                    'cross_attention_dim': 40, 'addition_time_embed_dim': 8,
                    'projection_class_embeddings_input_dim': 16 + 6 * 8}, (8, 8), 700, 16),
    ('sdxl-odd-latent', {**_TINY, **_XL, 'attention_head_dim': [2, 4], 'cross_attention_dim': 32,
                         'addition_time_embed_dim': 4, 'projection_class_embeddings_input_dim': 12 + 6 * 4},
     (9, 9), [20, 980], 12),
    ('sdxl-per-block-lists', {**_TINY, **_XL, 'layers_per_block': [2, 1], 'attention_head_dim': 4,
                              'transformer_layers_per_block': [1, 2], 'cross_attention_dim': 24,
                              'addition_time_embed_dim': 5,
                              'projection_class_embeddings_input_dim': 20 + 6 * 5},
     (8, 8), 1, 20),
]


def _pair(config: dict, seed: int = 0):
  """A randomised diffusers UNet and ours with the same weights, ours built from the config.json that
  diffusers writes (so every field it emits must be known to us)."""
  ref = randomize(TorchUNet(**config), seed=seed, scale=0.1)
  written = json.loads(ref.to_json_string())
  ours = nnx.eval_shape(lambda: UNet2DConditionModel(written, rngs=nnx.Rngs(0)))
  assert_same_names(ours, ref)
  return ref, load_from_torch(ours, ref)


def _inputs(config: dict, size, pooled, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  cross = config['cross_attention_dim']
  cross = cross if isinstance(cross, int) else cross[0]
  sample = rng.standard_normal((batch, *size, 4)).astype(np.float32)
  context = rng.standard_normal((batch, 5, cross)).astype(np.float32)
  added = None
  if pooled:
    time_ids = np.array([[64, 48, 0, 4, 64, 64]], np.float32) + rng.integers(0, 8, (batch, 6))
    added = {'text_embeds': rng.standard_normal((batch, pooled)).astype(np.float32),
             'time_ids': time_ids.astype(np.float32)}
  return sample, context, added


@nnx.jit
def _apply(model, sample, timesteps, context, added):
  return model(sample, timesteps, context, added)


@pytest.mark.parity
@pytest.mark.parametrize('name,config,size,timesteps,pooled', CASES, ids=[c[0] for c in CASES])
def test_parity_with_diffusers(name, config, size, timesteps, pooled):
  ref, ours = _pair(config)
  sample, context, added = _inputs(config, size, pooled)
  want = ref(torch.from_numpy(nchw(sample)), torch.as_tensor(timesteps), torch.from_numpy(context),
             added_cond_kwargs=added and {k: torch.from_numpy(v) for k, v in added.items()}).sample
  got = _apply(ours, sample, jnp.asarray(timesteps), context, added)
  assert got.shape == (2, *size, 4)
  err = rel_err(got, nhwc(want))
  print(f'{name}: relative error {err:.2e}')
  assert err <= 1e-4


@pytest.mark.parametrize('name,tensors,params', [('sd-v1-4', 686, 859_520_964), ('sd-v2-1', 686, 865_910_724),
                                                 ('sdxl-base-1.0', 1680, 2_567_463_684)])
def test_full_size_structure_matches_diffusers(name, tensors, params):
  config = json.loads((REFERENCE_CONFIGS / name / 'unet' / 'config.json').read_text())
  ours = param_shapes(nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0))))
  assert len(ours) == tensors
  assert sum(int(np.prod(s)) for s in ours.values()) == params
  with torch.device('meta'):
    ref = TorchUNet.from_config(config)
  assert ours == {k: tuple(v.shape) for k, v in ref.named_parameters()}


# One level, no resampling: the smallest UNet with transformers in a down block and the mid block.
_SMALL = {**_TINY, 'block_out_channels': [32], 'down_block_types': ['CrossAttnDownBlock2D'],
          'up_block_types': ['UpBlock2D'], 'attention_head_dim': 4, 'cross_attention_dim': 16}


@pytest.mark.parametrize('field,value', [
    ('resnet_time_scale_shift', 'scale_shift'), ('class_embed_type', 'timestep'), ('time_cond_proj_dim', 8),
    ('num_attention_heads', 4), ('attention_type', 'gated'), ('conv_in_kernel', 5), ('dropout', 0.1),
    ('down_block_types', ['AttnDownBlock2D']), ('mid_block_type', 'UNetMidBlock2D'),
    ('transformer_layers_per_block', [[1, 2]]), ('addition_embed_type', 'text'),
    ('attention_head_dim', [4, 8]), ('esd_unknown_field', 1)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ModelConfigError, match=field):
    UNet2DConditionModel({**_SMALL, field: value}, rngs=nnx.Rngs(0), source='unet/config.json')


def test_text_time_needs_its_inputs():
  config = {**_SMALL, 'addition_embed_type': 'text_time', 'addition_time_embed_dim': 4}
  with pytest.raises(ModelConfigError, match='projection_class_embeddings_input_dim'):
    UNet2DConditionModel(config, rngs=nnx.Rngs(0))
  model = nnx.eval_shape(lambda: UNet2DConditionModel(
      {**config, 'projection_class_embeddings_input_dim': 32}, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="added_cond_kwargs"):
    model(jnp.zeros((1, 8, 8, 4)), 1, jnp.zeros((1, 3, 16)))


@pytest.fixture(scope='module')
def small():
  """The smallest UNet with its inputs, and one jitted fp32 pass giving both its output and gradients."""
  _, model = _pair(_SMALL)
  sample, context, _ = _inputs(_SMALL, (8, 8), None)
  timesteps = jnp.asarray([5, 900])

  @nnx.jit
  def output_and_grads(model):
    def loss(m):
      out = m(sample, timesteps, context)
      return jnp.mean(out ** 2), out
    return nnx.value_and_grad(loss, has_aux=True)(model)

  (_, out), grads = output_and_grads(model)
  return model, (sample, timesteps, context), out, grads


def test_bf16_forward_stays_close_to_fp32(small):
  model, (sample, timesteps, context), want, _ = small
  got = _apply(model, sample.astype(jnp.bfloat16), timesteps, context, None)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got.astype(jnp.float32), want) < 3e-2


def test_gradients_reach_every_parameter(small):
  model, _, _, grads = small
  flat = {'.'.join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
  assert flat.keys() == param_shapes(model).keys()
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in flat.values())
