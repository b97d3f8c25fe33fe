"""Timestep embeddings of the UNet: diffusers' `get_timestep_embedding` and `TimestepEmbedding`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.models.layers import Linear, activation


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features (N, dim) of N (possibly fractional) timesteps, always in fp32.

  Frequencies are exp(-log(max_period) · k / (dim/2 − freq_shift)); the output is [sin, cos] or, with
  `flip_sin_to_cos`, [cos, sin], zero-padded by one column when `dim` is odd.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
  """diffusers' TimestepEmbedding: linear_1 → act → linear_2 (→ optional post activation)."""

  def __init__(self, in_features: int, dim: int, *, act_fn: str = 'silu', post_act_fn: str | None = None,
               rngs: nnx.Rngs):
    self.linear_1 = Linear(in_features, dim, rngs=rngs)
    self.linear_2 = Linear(dim, dim, rngs=rngs)
    self.act = activation(act_fn)
    self.post_act = activation(post_act_fn) if post_act_fn else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.linear_2(self.act(self.linear_1(x)))
    return self.post_act(y) if self.post_act is not None else y
