"""Building blocks of the UNet: the spatial transformer and the down, mid and up blocks.

Each class mirrors the diffusers module of the same role, with the same attribute names, so parameter
paths are diffusers' state-dict keys. Activations are NHWC; skip connections are concatenated on the
channel (last) axis, which is where diffusers' NCHW `torch.cat(dim=1)` puts them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.models.layers import (Attention, Conv2d, Downsample2D, GroupNorm, LayerNorm, Linear,
                                   ResnetBlock2D, Upsample2D)


class GEGLU(nnx.Module):
  """Gated GELU: one projection to 2·dim_out, split into value and gate, value · gelu(gate)."""

  def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs):
    self.proj = Linear(dim_in, 2 * dim_out, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """diffusers' FeedForward with GEGLU: net.0 (GEGLU), net.1 (dropout), net.2 (Linear)."""

  def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs):
    inner = dim * mult
    # Slot 1 is diffusers' parameter-free Dropout; keeping it keeps the output layer's key at `net.2`.
    self.net = nnx.List([GEGLU(dim, inner, rngs=rngs), None, Linear(inner, dim, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Pre-norm self-attention, cross-attention on the text tokens, and GEGLU feed-forward, each residual."""

  def __init__(self, dim: int, *, heads: int, dim_head: int, cross_attention_dim: int, rngs: nnx.Rngs):
    self.norm1 = LayerNorm(dim)
    self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, rngs=rngs)
    self.norm2 = LayerNorm(dim)
    self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
                           rngs=rngs)
    self.norm3 = LayerNorm(dim)
    self.ff = FeedForward(dim, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context) + x
    return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
  """diffusers' Transformer2DModel on continuous inputs (the UNet's spatial transformer).

  GroupNorm, proj_in, `num_layers` BasicTransformerBlocks over the H·W tokens, proj_out, plus the input.
  The projections are 1×1 convs (SD 1.x) or Linear layers (`use_linear_projection`, SD 2.x/XL); on
  NHWC activations both are the same per-pixel matrix product, so one code path serves both.
  Head width is channels // heads, as in diffusers.
  """

  def __init__(self, channels: int, *, heads: int, cross_attention_dim: int, num_layers: int, groups: int,
               use_linear_projection: bool, rngs: nnx.Rngs):
    dim_head = channels // heads
    inner = heads * dim_head
    self.norm = GroupNorm(groups, channels, eps=1e-6)
    if use_linear_projection:
      self.proj_in = Linear(channels, inner, rngs=rngs)
    else:
      self.proj_in = Conv2d(channels, inner, 1, rngs=rngs)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
                              rngs=rngs)
        for _ in range(num_layers)])
    if use_linear_projection:
      self.proj_out = Linear(inner, channels, rngs=rngs)
    else:
      self.proj_out = Conv2d(inner, channels, 1, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    y = self.proj_in(self.norm(x))
    y = y.reshape(b, h * w, y.shape[-1])
    for block in self.transformer_blocks:
      y = block(y, context)
    return self.proj_out(y.reshape(b, h, w, y.shape[-1])) + x


# Keyword arguments shared by every resnet of a UNet (temb_channels, groups, eps, act_fn) and by every
# spatial transformer of a block (heads, cross_attention_dim, num_layers, groups, use_linear_projection).
ResnetArgs = Mapping[str, Any]
AttentionArgs = Mapping[str, Any]


def _transformers(channels: int, count: int, attention: AttentionArgs | None, rngs: nnx.Rngs):
  if attention is None:
    return None
  return nnx.List([Transformer2DModel(channels, **attention, rngs=rngs) for _ in range(count)])


class DownBlock(nnx.Module):
  """diffusers' CrossAttnDownBlock2D (`attention` given) or DownBlock2D (`attention` None).

  Returns the block's output and its skip tensors: one per resnet(+transformer) layer, and the
  downsampled output when the block downsamples.
  """

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, resnet: ResnetArgs,
               attention: AttentionArgs | None, add_downsample: bool, downsample_padding: int,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **resnet, rngs=rngs)
        for i in range(num_layers)])
    self.attentions = _transformers(out_channels, num_layers, attention, rngs)
    self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=downsample_padding, rngs=rngs)])
                         if add_downsample else None)

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class MidBlock(nnx.Module):
  """diffusers' UNetMidBlock2DCrossAttn with its single layer: resnet, transformer, resnet."""

  def __init__(self, channels: int, *, resnet: ResnetArgs, attention: AttentionArgs, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, **resnet, rngs=rngs) for _ in range(2)])
    self.attentions = _transformers(channels, 1, attention, rngs)

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    x = self.resnets[0](x, temb)
    return self.resnets[1](self.attentions[0](x, context), temb)


class UpBlock(nnx.Module):
  """diffusers' CrossAttnUpBlock2D (`attention` given) or UpBlock2D (`attention` None).

  Layer i concatenates the i-th skip from the end onto its input. The last layer's skip comes from the
  previous (larger, `in_channels`-wide) down block; `prev_channels` is the width arriving from below.
  """

  def __init__(self, in_channels: int, prev_channels: int, out_channels: int, *, num_layers: int,
               resnet: ResnetArgs, attention: AttentionArgs | None, add_upsample: bool, rngs: nnx.Rngs):
    def resnet_in(i):
      return ((prev_channels if i == 0 else out_channels)
              + (in_channels if i == num_layers - 1 else out_channels))
    self.resnets = nnx.List([ResnetBlock2D(resnet_in(i), out_channels, **resnet, rngs=rngs)
                             for i in range(num_layers)])
    self.attentions = _transformers(out_channels, num_layers, attention, rngs)
    self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs)]) if add_upsample else None

  def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
               upsample_size: tuple[int, int] | None = None) -> jax.Array:
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x
