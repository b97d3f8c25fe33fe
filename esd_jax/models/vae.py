"""diffusers' `AutoencoderKL`, the Stable Diffusion VAE, on NHWC images.

Built from the diffusers `vae/config.json`; parameter paths are the diffusers state-dict keys
(`encoder.down_blocks.0.resnets.0.conv1.weight`, `decoder.mid_block.attentions.0.to_q.weight`, ...).
Compute dtype follows the input. `force_upcast` is kept in `self.config` for the pipeline to honour (it
decides the dtype it feeds in); `scaling_factor` likewise is the pipeline's to apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.models.config import ModelConfigError, read_config
from esd_jax.models.layers import (Attention, Conv2d, Downsample2D, GroupNorm, ParamKeys, ResnetBlock2D,
                                   Upsample2D)

_DEFAULTS = {
    'in_channels': 3,
    'out_channels': 3,
    'down_block_types': ['DownEncoderBlock2D'],
    'up_block_types': ['UpDecoderBlock2D'],
    'block_out_channels': [64],
    'layers_per_block': 1,
    'act_fn': 'silu',
    'latent_channels': 4,
    'norm_num_groups': 32,
    'sample_size': 32,  # only sizes diffusers' tiled decoding
    'scaling_factor': 0.18215,
    'shift_factor': None,
    'latents_mean': None,
    'latents_std': None,
    'force_upcast': True,
    'use_quant_conv': True,
    'use_post_quant_conv': True,
    'mid_block_add_attention': True,
}

_SUPPORTED = {
    'down_block_types': lambda v: all(t == 'DownEncoderBlock2D' for t in v),
    'up_block_types': lambda v: all(t == 'UpDecoderBlock2D' for t in v),
    # diffusers' get_activation names that layers.activation implements identically.
    'act_fn': ('silu', 'swish', 'gelu'),
    # The SD pipelines only apply `scaling_factor`; latent shifts and per-channel statistics belong to
    # other model families, so a VAE that needs them would be mis-scaled.
    'shift_factor': (None,),
    'latents_mean': (None,),
    'latents_std': (None,),
    'force_upcast': (True, False),
    'use_quant_conv': (True, False),
    'use_post_quant_conv': (True, False),
    'mid_block_add_attention': (True, False),
}

# diffusers hard-codes these for the VAE's blocks.
_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)


class MidBlock(nnx.Module):
  """diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, single-head spatial attention, resnet."""

  def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool, rngs: nnx.Rngs):
    resnet = lambda: ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS,
                                   act_fn=act_fn, rngs=rngs)
    self.resnets = nnx.List([resnet(), resnet()])
    # One head as wide as the block (attention_head_dim = channels in diffusers' Encoder/Decoder).
    self.attentions = nnx.List([
        Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=_EPS,
                  residual_connection=True, rngs=rngs)
    ] if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


def _resnets(in_channels: int, out_channels: int, n: int, groups: int, act_fn: str, rngs) -> nnx.List:
  return nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                                 groups=groups, eps=_EPS, act_fn=act_fn, rngs=rngs) for i in range(n)])


class DownEncoderBlock2D(nnx.Module):
  """Resnets, then (except in the last block) the VAE's asymmetric-padding stride-2 conv."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, act_fn: str,
               add_downsample: bool, rngs: nnx.Rngs):
    self.resnets = _resnets(in_channels, out_channels, num_layers, groups, act_fn, rngs)
    self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, rngs=rngs)] if add_downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for down in self.downsamplers:
      x = down(x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """Resnets, then (except in the last block) nearest ×2 upsampling and a conv."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, act_fn: str,
               add_upsample: bool, rngs: nnx.Rngs):
    self.resnets = _resnets(in_channels, out_channels, num_layers, groups, act_fn, rngs)
    self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs)] if add_upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for up in self.upsamplers:
      x = up(x)
    return x


class Encoder(nnx.Module):
  """Image (B, H, W, in_channels) → diagonal-Gaussian parameters (B, H/f, W/f, 2·latent_channels)."""

  def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs):
    widths, groups, act_fn = config['block_out_channels'], config['norm_num_groups'], config['act_fn']
    self.conv_in = Conv2d(config['in_channels'], widths[0], 3, padding=1, rngs=rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(widths[max(i - 1, 0)], width, num_layers=config['layers_per_block'],
                           groups=groups, act_fn=act_fn, add_downsample=i < len(widths) - 1, rngs=rngs)
        for i, width in enumerate(widths)
    ])
    self.mid_block = MidBlock(widths[-1], groups=groups, act_fn=act_fn,
                              add_attention=config['mid_block_add_attention'], rngs=rngs)
    self.conv_norm_out = GroupNorm(groups, widths[-1], eps=_EPS)
    self.conv_out = Conv2d(widths[-1], 2 * config['latent_channels'], 3, padding=1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    # diffusers' conv_act is SiLU whatever act_fn says.
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latents (B, h, w, latent_channels) → image (B, h·f, w·f, out_channels)."""

  def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs):
    widths, groups, act_fn = config['block_out_channels'], config['norm_num_groups'], config['act_fn']
    reversed_widths = list(reversed(widths))
    self.conv_in = Conv2d(config['latent_channels'], widths[-1], 3, padding=1, rngs=rngs)
    self.mid_block = MidBlock(widths[-1], groups=groups, act_fn=act_fn,
                              add_attention=config['mid_block_add_attention'], rngs=rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(reversed_widths[max(i - 1, 0)], width, num_layers=config['layers_per_block'] + 1,
                         groups=groups, act_fn=act_fn, add_upsample=i < len(widths) - 1, rngs=rngs)
        for i, width in enumerate(reversed_widths)
    ])
    self.conv_norm_out = GroupNorm(groups, widths[0], eps=_EPS)
    self.conv_out = Conv2d(widths[0], config['out_channels'], 3, padding=1, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL-regularised autoencoder of latent diffusion (diffusers' `AutoencoderKL`).

  Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels at 1/2^(len(blocks)-1)
  the resolution, unscaled (multiply by `config['scaling_factor']` before the UNet, divide after).
  """

  def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, source: str = 'config.json'):
    self.config = read_config('AutoencoderKL', config, _DEFAULTS, _SUPPORTED, source=source)
    rngs = ParamKeys(rngs)
    c = self.config
    lengths = {k: len(c[k]) for k in ('block_out_channels', 'down_block_types', 'up_block_types')}
    if len(set(lengths.values())) != 1:
      raise ModelConfigError(f'{source}: AutoencoderKL needs one entry per block in block_out_channels, '
                        f'down_block_types and up_block_types; got lengths {lengths}.')
    latent = c['latent_channels']
    self.encoder = Encoder(c, rngs=rngs)
    self.decoder = Decoder(c, rngs=rngs)
    self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, rngs=rngs) if c['use_quant_conv'] else None
    self.post_quant_conv = Conv2d(latent, latent, 1, rngs=rngs) if c['use_post_quant_conv'] else None

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image → (mean, logvar) of the posterior, logvar clamped to [-30, 20] as diffusers does."""
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  @staticmethod
  def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian N(mean, exp(logvar))."""
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents → image."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Reconstruction: decodes the posterior mean, or a posterior sample when `key` is given."""
    mean, logvar = self.encode(x)
    return self.decode(mean if key is None else self.sample_latent(mean, logvar, key))
