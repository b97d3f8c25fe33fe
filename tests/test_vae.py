"""AutoencoderKL against diffusers: numerics on small random models, structure at full size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

from esd_jax.models import build_abstract
from esd_jax.models.config import ModelConfigError
from esd_jax.models.state_dict import param_shapes
from esd_jax.models.vae import AutoencoderKL
from tests.reference import assert_same_names, load_from_torch, nchw, nhwc, randomize, rel_err

REFERENCE = Path(__file__).parent.parent / 'esd_jax' / 'models' / 'reference_configs'
SD_VAE_PARAMS = 83_653_863


def _config(widths, **kw):
  return dict(block_out_channels=widths, down_block_types=['DownEncoderBlock2D'] * len(widths),
              up_block_types=['UpDecoderBlock2D'] * len(widths), **kw)


SMALL = {
    'two-blocks': (_config([16, 32], norm_num_groups=8, layers_per_block=1), 16),
    'sd-shaped': (_config([8, 16, 16, 32], norm_num_groups=8, layers_per_block=2, latent_channels=4), 32),
    'three-blocks-gelu': (_config([16, 16, 24], norm_num_groups=4, layers_per_block=1, latent_channels=3,
                                  in_channels=4, out_channels=2, act_fn='gelu'), 16),
    'one-block-no-attn-no-quant': (_config([32], norm_num_groups=8, layers_per_block=2, latent_channels=8,
                                           mid_block_add_attention=False, use_quant_conv=False,
                                           use_post_quant_conv=False), 16),
}


def _pair(config, scale_conv_out=1.0):
  ref = randomize(TorchVAE(**config).eval())
  ref.encoder.conv_out.weight.mul_(scale_conv_out)
  # The config exactly as diffusers writes it to config.json (every field, plus its bookkeeping keys);
  # built abstract (eager random init is slow) and filled from the reference.
  ours = build_abstract(json.loads(ref.to_json_string()))
  assert isinstance(ours, AutoencoderKL)
  assert_same_names(ours, ref)
  return load_from_torch(ours, ref), ref


# Jitted: one compilation is much faster than eager dispatch of every op.
_encode = nnx.jit(AutoencoderKL.encode)


@nnx.jit
def _run(vae: AutoencoderKL, x, z):
  return *vae.encode(x), vae.decode(z), vae(x)


@pytest.mark.parity
@pytest.mark.parametrize('name', list(SMALL))
def test_encode_decode_parity(name):
  config, size = SMALL[name]
  ours, ref = _pair(config)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, size, size, config.get('in_channels', 3))).astype(np.float32)
  posterior = ref.encode(torch.from_numpy(nchw(x))).latent_dist
  z = rng.standard_normal(nhwc(posterior.mean).shape).astype(np.float32)
  mean, logvar, decoded, reconstructed = _run(ours, x, z)
  errors = {'mean': rel_err(mean, nhwc(posterior.mean)), 'logvar': rel_err(logvar, nhwc(posterior.logvar)),
            'decode': rel_err(decoded, nhwc(ref.decode(torch.from_numpy(nchw(z))).sample)),
            'reconstruct': rel_err(reconstructed, nhwc(ref(torch.from_numpy(nchw(x))).sample))}
  print(name, errors)
  assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parity
def test_logvar_clamp_and_sampling():
  config, size = SMALL['two-blocks']
  # Huge conv_out weights push logvar far outside [-30, 20].
  ours, ref = _pair(config, scale_conv_out=1e3)
  x = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
  _, logvar = _encode(ours, x)
  assert float(logvar.min()) == -30.0 and float(logvar.max()) == 20.0
  assert rel_err(logvar, nhwc(ref.encode(torch.from_numpy(nchw(x))).latent_dist.logvar)) <= 1e-4

  mean, logvar = np.zeros((4096, 2), np.float32), np.full((4096, 2), np.log(9.0), np.float32)
  z = np.asarray(AutoencoderKL.sample_latent(mean + 1.0, logvar, nnx.Rngs(3).params()))
  assert abs(z.mean() - 1.0) < 0.2 and abs(z.std() - 3.0) < 0.2


@pytest.mark.parametrize('model', ['sd-v1-4', 'sd-v2-1', 'sdxl-base-1.0'])
def test_full_size_structure(model):
  config = json.loads((REFERENCE / model / 'vae' / 'config.json').read_text())
  ours = build_abstract(config)
  assert isinstance(ours, AutoencoderKL)
  with torch.device('meta'):
    ref = TorchVAE.from_config(config)
  shapes = param_shapes(ours)
  assert shapes == {k: tuple(v.shape) for k, v in ref.named_parameters()}
  assert sum(int(np.prod(s)) for s in shapes.values()) == SD_VAE_PARAMS
  assert ours.config['scaling_factor'] == ref.config.scaling_factor


@pytest.mark.parametrize('change,field', [
    ({'attention_head_dim': 8}, 'attention_head_dim'),
    ({'shift_factor': 0.1159}, 'shift_factor'),
    ({'latents_mean': [0.0] * 4}, 'latents_mean'),
    ({'act_fn': 'mish'}, 'act_fn'),
    ({'down_block_types': ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D']}, 'down_block_types'),
    ({'up_block_types': ['UpDecoderBlock2D']}, 'up_block_types'),
])
def test_bad_config(change, field):
  config = {**SMALL['two-blocks'][0], '_class_name': 'AutoencoderKL', **change}
  with pytest.raises(ModelConfigError, match=field):
    AutoencoderKL(config, rngs=nnx.Rngs(0), source='vae/config.json')
