"""Primitive layers shared by the UNet, the VAE and the CLIP text encoder.

Parameters carry PyTorch's names and, but for convolution kernels, its layouts: `weight`/`bias`, Linear weights
as (out, in). A module's flat parameter path joined with '.' is therefore the diffusers/transformers state-dict key,
and loading or saving a checkpoint is a rename-free copy (bit-exact round trips, one tensor at a time straight to
its device). Convolution kernels are held HWIO, the layout XLA convolves with, and stored OIHW in checkpoints:
state_dict.py converts them at that boundary. Activations are NHWC.

Compute dtype follows the activations: each layer casts its fp32 parameters to the dtype of its input,
so a model run on bf16 inputs computes in bf16 while its parameters (and gradients) stay fp32.
Normalisation statistics are always taken in fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.models import attention


class ParamKeys:
  """Stands in for `nnx.Rngs` while a model's layers draw their initial values: `params()` folds a
  Python counter into one key drawn from the caller's Rngs, so initialisation stays seeded by it.

  Why: every `nnx.Rngs` draw writes its counter Variable, and under tracing (`nnx.eval_shape`, i.e.
  every abstract build before a checkpoint load) flax's `Variable.set_value` probes `tracer.sharding`,
  whose error message JAX builds by scanning the whole trace so far. That is quadratic in the number of
  parameters: 47 s to build SDXL's 1,680 tensors abstractly, against 3.6 s with this.
  """

  def __init__(self, rngs: nnx.Rngs):
    self._key = rngs.params()
    self._count = 0

  def params(self) -> jax.Array:
    self._count += 1
    return jax.random.fold_in(self._key, self._count)


def _uniform(rngs: nnx.Rngs, shape, bound: float) -> jax.Array:
  return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)


class Linear(nnx.Module):
  """torch.nn.Linear: y = x Wᵀ + b, W of shape (out, in); torch's default initialisation."""

  def __init__(self, in_features: int, out_features: int, *, bias: bool = True, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(in_features)
    self.weight = nnx.Param(_uniform(rngs, (out_features, in_features), bound))
    self.bias = nnx.Param(_uniform(rngs, (out_features,), bound)) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum('...i,oi->...o', x, self.weight[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class Conv2d(nnx.Module):
  """torch.nn.Conv2d on NHWC activations; its kernel held HWIO (PyTorch's OIHW in checkpoints, state_dict.py).

  `padding` is an int (symmetric, as in torch) or explicit ((top, bottom), (left, right)).
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               padding=0, bias: bool = True, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
    # Drawn OIHW as before the layout changed, so seeded initial values stay what they were.
    oihw = _uniform(rngs, (out_channels, in_channels, kernel_size, kernel_size), bound)
    self.weight = nnx.Param(jnp.transpose(oihw, (2, 3, 1, 0)))
    self.bias = nnx.Param(_uniform(rngs, (out_channels,), bound)) if bias else None
    self.stride = stride
    self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding

  def __call__(self, x: jax.Array) -> jax.Array:
    # Held HWIO: an OIHW kernel makes XLA copy every kernel transposed, copies it hoists out of the sampler's loop
    # and holds all at once (2.6 GiB of an SD 1.4 ESD-x step), and runs ~20× slower in loops on XLA:CPU
    # (jax-ml/jax#12868).
    kernel = self.weight[...].astype(x.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), self.padding,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over the channel (last) axis of NHWC or (B, T, C) activations."""

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5, affine: bool = True):
    if num_channels % num_groups:
      raise ValueError(f'GroupNorm: {num_channels} channels do not split into {num_groups} groups; '
                       'pick norm_num_groups that divides every block width.')
    self.num_groups = num_groups
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32)) if affine else None
    self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32)) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    # Statistics as per-channel means over the spatial axes, then averaged within each group (every
    # channel has as many elements, so this is the group mean exactly). Reducing a (B, HW, G, C/G) view
    # over two axes at once is ~9× slower on XLA:CPU for narrow layers, in the forward and the backward.
    b, c = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))

    def group_mean(per_channel):  # (B, C) → each channel's group mean, broadcastable against x
      means = per_channel.reshape(b, self.num_groups, c // self.num_groups).mean(-1)
      return jnp.repeat(means, c // self.num_groups, axis=-1).reshape(b, *(1,) * len(axes), c)

    centred = x.astype(jnp.float32) - group_mean(x.astype(jnp.float32).mean(axes))
    y = centred * jax.lax.rsqrt(group_mean(jnp.square(centred).mean(axes)) + self.eps)
    if self.weight is not None:
      y = y * self.weight[...] + self.bias[...]
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis."""

  def __init__(self, dim: int, *, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32)) if elementwise_affine else None
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if elementwise_affine and bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    y = (h - mean) * jax.lax.rsqrt(var + self.eps)
    if self.weight is not None:
      y = y * self.weight[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


class Embedding(nnx.Module):
  """torch.nn.Embedding (weight of shape (num, dim), N(0, 1) initialisation)."""

  def __init__(self, num_embeddings: int, dim: int, *, rngs: nnx.Rngs):
    self.weight = nnx.Param(jax.random.normal(rngs.params(), (num_embeddings, dim), jnp.float32))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], ids, axis=0)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'quick_gelu': quick_gelu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


class Attention(nnx.Module):
  """diffusers' `Attention` (to_q/to_k/to_v/to_out.0), self- or cross-attention.

  `attention_implementation` (models/attention.py) picks the kernel; the default is the XLA reference. With
  `norm_num_groups` it is the VAE's spatial attention block: a `group_norm` first, NHWC in and out, and a
  residual connection divided by `rescale_output_factor`.
  """

  attention_implementation = 'xla'

  def __init__(self, query_dim: int, *, cross_attention_dim: int | None = None, heads: int = 8,
               dim_head: int = 64, bias: bool = False, out_bias: bool = True,
               norm_num_groups: int | None = None, eps: float = 1e-5, residual_connection: bool = False,
               rescale_output_factor: float = 1.0, rngs: nnx.Rngs):
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    self.heads = heads
    self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups else None
    self.to_q = Linear(query_dim, inner, bias=bias, rngs=rngs)
    self.to_k = Linear(kv_dim, inner, bias=bias, rngs=rngs)
    self.to_v = Linear(kv_dim, inner, bias=bias, rngs=rngs)
    self.to_out = nnx.List([Linear(inner, query_dim, bias=out_bias, rngs=rngs)])
    self.residual_connection = residual_connection
    self.rescale_output_factor = rescale_output_factor

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    residual, spatial = x, x.ndim == 4
    if spatial:
      b, h, w, c = x.shape
      x = x.reshape(b, h * w, c)
    if self.group_norm is not None:
      x = self.group_norm(x)
    context = x if context is None else context
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # (B, T, N, H)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    y = attention.dot_product_attention(q, k, v, implementation=self.attention_implementation)
    y = self.to_out[0](y.reshape(*y.shape[:-2], -1))
    if spatial:
      y = y.reshape(b, h, w, c)
    if self.residual_connection:
      y = y + residual
    return y / self.rescale_output_factor if self.rescale_output_factor != 1.0 else y


class ResnetBlock2D(nnx.Module):
  """diffusers' ResnetBlock2D (pre-norm, 'default' time-embedding norm, optional 1×1 shortcut)."""

  def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None,
               groups: int = 32, groups_out: int | None = None, eps: float = 1e-6, act_fn: str = 'silu',
               output_scale_factor: float = 1.0, rngs: nnx.Rngs):
    out_channels = out_channels or in_channels
    self.act = activation(act_fn)
    self.norm1 = GroupNorm(groups, in_channels, eps=eps)
    self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, rngs=rngs)
    self.time_emb_proj = Linear(temb_channels, out_channels, rngs=rngs) if temb_channels else None
    self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps)
    self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, rngs=rngs)
    self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, rngs=rngs)
                          if in_channels != out_channels else None)
    self.output_scale_factor = output_scale_factor

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(self.act(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
    h = self.conv2(self.act(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    y = shortcut + h
    return y / self.output_scale_factor if self.output_scale_factor != 1.0 else y


class Downsample2D(nnx.Module):
  """Stride-2 3×3 conv. padding=0 is the VAE's form: pad right and bottom by one first."""

  def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1, rngs: nnx.Rngs):
    pad = ((0, 1), (0, 1)) if padding == 0 else padding
    self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=pad, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour ×2, then a 3×3 conv (torch's F.interpolate(mode='nearest'))."""

  def __init__(self, channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, out_channels or channels, 3, padding=1, rngs=rngs)

  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    if output_size is None:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    else:  # odd sizes in the UNet's skip path: nearest index floor(i * in / out), as torch does
      rows = (jnp.arange(output_size[0]) * x.shape[1]) // output_size[0]
      cols = (jnp.arange(output_size[1]) * x.shape[2]) // output_size[1]
      x = x[:, rows][:, :, cols]
    return self.conv(x)
