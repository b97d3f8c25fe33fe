"""diffusers' UNet2DConditionModel in Flax NNX: the denoiser of SD 1.x, SD 2.x and SDXL.

Built from the UNet's diffusers `config.json`; parameter paths are diffusers' state-dict keys
(`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`, ...). Supported: the block types
CrossAttnDownBlock2D/DownBlock2D, CrossAttnUpBlock2D/UpBlock2D and the UNetMidBlock2DCrossAttn mid
block; conv or linear transformer projections; per-block head counts, resnet and transformer depths;
odd latent sizes; the SDXL "text_time" added embedding. Everything else a config can ask for is a
ModelConfigError naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.models.config import ModelConfigError, read_config
from esd_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from esd_jax.models.layers import Conv2d, GroupNorm, ParamKeys, activation
from esd_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock

# Every field of diffusers' UNet2DConditionModel.__init__, with diffusers' defaults.
_DEFAULTS: dict[str, Any] = {
    'sample_size': None, 'in_channels': 4, 'out_channels': 4, 'center_input_sample': False,
    'flip_sin_to_cos': True, 'freq_shift': 0,
    'down_block_types': ['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
    'mid_block_type': 'UNetMidBlock2DCrossAttn',
    'up_block_types': ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3,
    'only_cross_attention': False, 'block_out_channels': [320, 640, 1280, 1280], 'layers_per_block': 2,
    'downsample_padding': 1, 'mid_block_scale_factor': 1, 'dropout': 0.0, 'act_fn': 'silu',
    'norm_num_groups': 32, 'norm_eps': 1e-5, 'cross_attention_dim': 1280, 'transformer_layers_per_block': 1,
    'reverse_transformer_layers_per_block': None, 'encoder_hid_dim': None, 'encoder_hid_dim_type': None,
    'attention_head_dim': 8, 'num_attention_heads': None, 'dual_cross_attention': False,
    'use_linear_projection': False, 'class_embed_type': None, 'addition_embed_type': None,
    'addition_time_embed_dim': None, 'num_class_embeds': None, 'upcast_attention': False,
    'resnet_time_scale_shift': 'default', 'resnet_skip_time_act': False, 'resnet_out_scale_factor': 1.0,
    'time_embedding_type': 'positional', 'time_embedding_dim': None, 'time_embedding_act_fn': None,
    'timestep_post_act': None, 'time_cond_proj_dim': None, 'conv_in_kernel': 3, 'conv_out_kernel': 3,
    'projection_class_embeddings_input_dim': None, 'attention_type': 'default',
    'class_embeddings_concat': False, 'mid_block_only_cross_attention': None, 'cross_attention_norm': None,
    'addition_embed_type_num_heads': 64,
}

_ACTIVATIONS = ('silu', 'swish', 'gelu')  # those of diffusers' get_activation that we implement
_DOWN_BLOCKS = ('CrossAttnDownBlock2D', 'DownBlock2D')
_UP_BLOCKS = ('CrossAttnUpBlock2D', 'UpBlock2D')


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _ints(v) -> bool:
  return isinstance(v, list | tuple) and len(v) > 0 and all(_is_int(x) for x in v)


def _int_or_ints(v) -> bool:
  return _is_int(v) or _ints(v)


# Fields not listed here are accepted with any value because they cannot change what the supported
# blocks compute: sample_size (a default resolution only), resnet_skip_time_act, resnet_out_scale_factor,
# cross_attention_norm, mid_block_only_cross_attention and addition_embed_type_num_heads (read only by
# block and embedding types we reject), and upcast_attention (our attention always takes its softmax in
# fp32 — every implementation in models/attention.py does so for bf16/fp16 inputs — which is what upcasting asks for).
_SUPPORTED: dict[str, Any] = {
    'in_channels': _is_int, 'out_channels': _is_int,
    'center_input_sample': (False, True), 'flip_sin_to_cos': (False, True),
    'freq_shift': lambda v: isinstance(v, int | float),
    'down_block_types': lambda v: len(v) > 0 and all(t in _DOWN_BLOCKS for t in v),
    'up_block_types': lambda v: len(v) > 0 and all(t in _UP_BLOCKS for t in v),
    'mid_block_type': ('UNetMidBlock2DCrossAttn',),
    'only_cross_attention': lambda v: not any(v) if isinstance(v, list | tuple) else v is False,
    'block_out_channels': _ints, 'layers_per_block': _int_or_ints,
    'downsample_padding': _is_int, 'mid_block_scale_factor': lambda v: isinstance(v, int | float),
    'dropout': (0, 0.0),  # no dropout layers: training with dropout would silently differ
    'act_fn': _ACTIVATIONS, 'norm_num_groups': _is_int,
    'cross_attention_dim': _is_int, 'transformer_layers_per_block': _int_or_ints,
    'reverse_transformer_layers_per_block': (None,), 'encoder_hid_dim': (None,),
    'encoder_hid_dim_type': (None,), 'attention_head_dim': _int_or_ints,
    # diffusers itself refuses a non-null num_attention_heads (its `attention_head_dim` holds head counts).
    'num_attention_heads': (None,),
    'dual_cross_attention': (False,), 'use_linear_projection': (False, True),
    'class_embed_type': (None,), 'addition_embed_type': (None, 'text_time'),
    'addition_time_embed_dim': lambda v: v is None or _is_int(v), 'num_class_embeds': (None,),
    'resnet_time_scale_shift': ('default',), 'time_embedding_type': ('positional',),
    'time_embedding_dim': lambda v: v is None or _is_int(v),
    'time_embedding_act_fn': (None, *_ACTIVATIONS), 'timestep_post_act': (None, *_ACTIVATIONS),
    'time_cond_proj_dim': (None,), 'conv_in_kernel': (3,), 'conv_out_kernel': (3,),
    'projection_class_embeddings_input_dim': lambda v: v is None or _is_int(v),
    'attention_type': ('default',), 'class_embeddings_concat': (False,),
}

_PER_BLOCK = ('block_out_channels', 'layers_per_block', 'transformer_layers_per_block', 'attention_head_dim',
              'up_block_types')


def _per_block(cfg: Mapping[str, Any], source: str) -> dict[str, list]:
  """The per-block settings as lists, one entry per down block (ints are repeated, as diffusers does)."""
  n = len(cfg['down_block_types'])
  out = {}
  for field in _PER_BLOCK:
    value = cfg[field]
    out[field] = [value] * n if _is_int(value) else list(value)
    if len(out[field]) != n:
      raise ModelConfigError(f'{source}: UNet2DConditionModel.{field} = {value!r} needs one entry per down block '
                        f'({n}: {cfg["down_block_types"]}).')
  return out


def _check_text_time(cfg: Mapping[str, Any], source: str):
  if cfg['addition_embed_type'] != 'text_time':
    return
  for field in ('addition_time_embed_dim', 'projection_class_embeddings_input_dim'):
    if cfg[field] is None:
      raise ModelConfigError(f'{source}: UNet2DConditionModel.{field} must be set when addition_embed_type is '
                        '"text_time".')


# Rematerialisation of the blocks: name → jax.checkpoint policy (what the forward pass keeps for the backward).
REMAT = {'none': None, 'blocks': jax.checkpoint_policies.nothing_saveable,
         'dots': jax.checkpoint_policies.dots_saveable}


class UNet2DConditionModel(nnx.Module):
  """The conditional UNet. Call: (sample NHWC, timesteps, encoder_hidden_states[, added_cond_kwargs]) →
  the prediction (NHWC, the sample's shape with out_channels).

  Computation runs in `sample.dtype` (parameters stay fp32); the sinusoidal timestep features are made
  in fp32 and cast, as diffusers does. `remat` (one of REMAT) rematerialises each down, mid and up block for the
  backward pass: 'blocks' keeps only the blocks' inputs, 'dots' the outputs of their matmuls too (convolutions,
  norms and activations are recomputed); a backward pass then holds one block's activations at a time.
  """

  remat = 'none'

  def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, source: str = 'config.json'):
    cfg = read_config('UNet2DConditionModel', config, _DEFAULTS, _SUPPORTED, source=source)
    _check_text_time(cfg, source)
    blocks = _per_block(cfg, source)
    rngs = ParamKeys(rngs)
    self.config = cfg
    channels = blocks['block_out_channels']
    # diffusers' historical naming: `attention_head_dim` holds the number of heads per block.
    heads = blocks['attention_head_dim']
    groups, n = cfg['norm_num_groups'], len(channels)
    time_dim = cfg['time_embedding_dim'] or 4 * channels[0]

    self.conv_in = Conv2d(cfg['in_channels'], channels[0], 3, padding=1, rngs=rngs)
    self.time_proj_dim = channels[0]
    self.time_embedding = TimestepEmbedding(channels[0], time_dim, act_fn=cfg['act_fn'],
                                            post_act_fn=cfg['timestep_post_act'], rngs=rngs)
    self.add_embedding = (TimestepEmbedding(cfg['projection_class_embeddings_input_dim'], time_dim, rngs=rngs)
                          if cfg['addition_embed_type'] == 'text_time' else None)
    self.time_embed_act = activation(cfg['time_embedding_act_fn']) if cfg['time_embedding_act_fn'] else None

    def resnet(scale=1.0):
      return dict(temb_channels=time_dim, groups=groups, eps=cfg['norm_eps'], act_fn=cfg['act_fn'],
                  output_scale_factor=scale)

    def attention(i):
      return dict(heads=heads[i], cross_attention_dim=cfg['cross_attention_dim'],
                  num_layers=blocks['transformer_layers_per_block'][i], groups=groups,
                  use_linear_projection=cfg['use_linear_projection'])

    self.down_blocks = nnx.List([
        DownBlock(channels[max(i - 1, 0)], channels[i], num_layers=blocks['layers_per_block'][i],
                  resnet=resnet(), attention=attention(i) if kind == 'CrossAttnDownBlock2D' else None,
                  add_downsample=i < n - 1, downsample_padding=cfg['downsample_padding'], rngs=rngs)
        for i, kind in enumerate(cfg['down_block_types'])])
    self.mid_block = MidBlock(channels[-1], resnet=resnet(cfg['mid_block_scale_factor']),
                              attention=attention(n - 1), rngs=rngs)
    # Up block i mirrors down block n-1-i: per-block settings are read reversed.
    self.up_blocks = nnx.List([
        UpBlock(channels[max(n - 2 - i, 0)], channels[min(n - i, n - 1)], channels[n - 1 - i],
                num_layers=blocks['layers_per_block'][n - 1 - i] + 1, resnet=resnet(),
                attention=attention(n - 1 - i) if kind == 'CrossAttnUpBlock2D' else None,
                add_upsample=i < n - 1, rngs=rngs)
        for i, kind in enumerate(blocks['up_block_types'])])
    self.conv_norm_out = GroupNorm(groups, channels[0], eps=cfg['norm_eps'])
    self.conv_act = activation(cfg['act_fn'])
    self.conv_out = Conv2d(channels[0], cfg['out_channels'], 3, padding=1, rngs=rngs)

  def _time_embedding(self, batch: int, timesteps, added_cond_kwargs, dtype) -> jax.Array:
    cfg = self.config
    sinusoid = dict(flip_sin_to_cos=cfg['flip_sin_to_cos'], freq_shift=cfg['freq_shift'])
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
    emb = self.time_embedding(timestep_embedding(t, self.time_proj_dim, **sinusoid).astype(dtype))
    if self.add_embedding is not None:
      text = added_cond_kwargs['text_embeds']
      ids = jnp.asarray(added_cond_kwargs['time_ids'])
      time = timestep_embedding(ids.reshape(-1), cfg['addition_time_embed_dim'], **sinusoid)
      added = jnp.concatenate([text, time.reshape(text.shape[0], -1)], axis=-1)
      emb = emb + self.add_embedding(added.astype(dtype))
    return self.time_embed_act(emb) if self.time_embed_act is not None else emb

  def __call__(self, sample: jax.Array, timesteps, encoder_hidden_states: jax.Array,
               added_cond_kwargs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    if self.add_embedding is not None and not {'text_embeds', 'time_ids'} <= set(added_cond_kwargs or ()):
      raise ValueError('This UNet has addition_embed_type "text_time" (SDXL): pass added_cond_kwargs='
                       "{'text_embeds': pooled text embeddings (B, D), 'time_ids': (B, 6)}.")
    dtype = sample.dtype
    if self.config['center_input_sample']:
      sample = 2 * sample - 1.0
    emb = self._time_embedding(sample.shape[0], timesteps, added_cond_kwargs, dtype)
    context = encoder_hidden_states.astype(dtype)

    x = self.conv_in(sample)
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = self._run(block, x, emb, context)
      skips += block_skips
    x = self._run(self.mid_block, x, emb, context)
    for block in self.up_blocks:
      k = len(block.resnets)
      block_skips, skips = skips[-k:], skips[:-k]
      size = None
      if block.upsamplers is not None:
        # Odd latent sizes: the downsampling convs rounded up, so upsample to the skip's exact size.
        target = skips[-1].shape[1:3]
        size = None if target == (2 * x.shape[1], 2 * x.shape[2]) else target
      x = self._run(block, x, block_skips, emb, context, upsample_size=size)
    return self.conv_out(self.conv_act(self.conv_norm_out(x)))

  def _run(self, block: nnx.Module, *arrays, **static):
    if self.remat == 'none':
      return block(*arrays, **static)
    return nnx.remat(lambda b, *a: b(*a, **static), policy=REMAT[self.remat])(block, *arrays)
