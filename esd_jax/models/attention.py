"""Scaled dot-product attention, four ways, one set of numbers: the kernels each backend is fastest with.

  xla      scores, an fp32 softmax and the weighted sum as three XLA ops: the reference (diffusers' numbers).
  chunked  the same per query row, over blocks of queries in a loop whose body is rematerialised: the
           (queries × keys) score matrix never exists whole, forward or backward. A 512 px SD UNet's
           self-attention scores are 4096² × 8 heads (512 MiB fp32 per image); this is XLA:CPU's fastest
           formulation too (cache-sized blocks).
  cudnn    cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU; bfloat16/float16).
  splash   the Pallas TPU splash-attention kernel (TPU) for attention whose query and key lengths are multiples
           of 128 (every self-attention of SD at 512 px but the 8×8 mid block); the rest (cross-attention over 77
           tokens: a small score matrix) runs `xla`.
  auto     the fastest the backend has: splash on TPU, cuDNN on GPU where the dtype allows it, chunked on CPU.

Modules hold the choice as a static attribute (`attention_implementation`, part of their graph definition, so a
jitted function compiles once per choice); `use(module, name)` sets it on every attention layer of a model. On GPU,
auto keeps `xla` for head dims cuDNN's flash kernel may not take (over 128, or not a multiple of 8: SD 1.x's
160-wide heads at 16×16 and 8×8 latents).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMPLEMENTATIONS = ('auto', 'xla', 'chunked', 'cudnn', 'splash')
_BACKEND_OF = {'cudnn': 'gpu', 'splash': 'tpu'}
AUTO = {'tpu': 'splash', 'gpu': 'cudnn', 'cpu': 'chunked'}  # what auto takes (on GPU: cuDNN where it can)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Scores per block of `chunked`: 2^22 fp32 elements (16 MiB), e.g. 128 queries × 4096 keys × 8 heads.
_CHUNK_SCORES = 2 ** 22
_SPLASH_BLOCK = 512
_LANES = 128  # splash's blocks are multiples of the TPU's 128 lanes


class AttentionUnavailableError(ValueError):
  """An attention implementation the backend does not have."""


def check(implementation: str, backend: str | None = None) -> None:
  """Raises a clear error when `implementation` is unknown or needs another backend than `backend` (default: JAX's
  default backend)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {implementation!r}; choose one of '
                     f'{", ".join(IMPLEMENTATIONS)} (auto takes the fastest this backend has).')
  backend = backend or jax.default_backend()
  needed = _BACKEND_OF.get(implementation)
  if needed is not None and backend != needed:
    raise AttentionUnavailableError(
        f'attention={implementation!r} runs on {needed.upper()} only, and this backend is {backend!r}: use '
        f'attention=auto (the fastest {backend!r} has) or xla.')


def use(module, implementation: str) -> None:
  """Sets the attention implementation of every attention layer in `module` (a model or a pipeline's model)."""
  check(implementation)
  for _, layer in nnx.iter_modules(module):
    if hasattr(layer, 'attention_implementation'):
      layer.attention_implementation = implementation


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = 'xla',
                          is_causal: bool = False) -> jax.Array:
  """softmax(q kᵀ / √d) v over (batch, length, heads, head_dim) arrays, the softmax in fp32 whatever their dtype."""
  if implementation == 'auto':
    implementation = _fastest(q)
  if implementation in _BACKEND_OF:
    check(implementation)
  if implementation == 'cudnn':
    if q.dtype not in _CUDNN_DTYPES:
      raise AttentionUnavailableError(f'attention=cudnn computes in bfloat16 or float16, and this model computes in '
                                      f'{q.dtype}: set the compute dtype to bfloat16, or attention=auto or xla.')
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation='cudnn')
  if implementation == 'splash' and not is_causal and _splash_fits(q, k):
    return _splash(q, k, v)
  if implementation == 'chunked':
    return _chunked(q, k, v, is_causal)
  return _xla(q, k, v, is_causal)


def resolved(implementation: str) -> str:
  """What `implementation` runs on this backend (auto's choice; on GPU, some layers may still fall back to xla)."""
  return AUTO.get(jax.default_backend(), 'xla') if implementation == 'auto' else implementation


def _fastest(q: jax.Array) -> str:
  choice = resolved('auto')
  if choice == 'cudnn' and not (q.dtype in _CUDNN_DTYPES and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0):
    return 'xla'
  return choice


def _xla(q, k, v, is_causal: bool, query_offset=0) -> jax.Array:
  scores = jnp.einsum('bqnh,bknh->bnqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  if is_causal:
    rows = query_offset + jnp.arange(q.shape[1])[:, None]
    scores = jnp.where(rows >= jnp.arange(k.shape[1])[None, :], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bnqk,bknh->bqnh', weights, v)


def _chunked(q, k, v, is_causal: bool) -> jax.Array:
  b, length, heads, dim = q.shape
  chunk = max(1, min(length, _CHUNK_SCORES // (k.shape[1] * heads)))
  if chunk >= length:
    return _xla(q, k, v, is_causal)
  blocks = -(-length // chunk)
  padded = jnp.pad(q, ((0, 0), (0, blocks * chunk - length), (0, 0), (0, 0)))  # padding rows are dropped below
  q_blocks = padded.reshape(b, blocks, chunk, heads, dim).swapaxes(0, 1)

  @jax.checkpoint  # the backward pass recomputes a block's scores instead of keeping every block's
  def block(args):
    q_block, offset = args
    return _xla(q_block, k, v, is_causal, offset)

  out = jax.lax.map(block, (q_blocks, jnp.arange(blocks) * chunk))
  return out.swapaxes(0, 1).reshape(b, blocks * chunk, heads, dim)[:, :length]


def _splash_fits(q, k) -> bool:
  return q.shape[1] % _LANES == 0 and k.shape[1] % _LANES == 0


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, q_length: int, kv_length: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  mask = splash.MultiHeadMask([splash.FullMask((q_length, kv_length))] * heads)
  bq, bkv = math.gcd(q_length, _SPLASH_BLOCK), math.gcd(kv_length, _SPLASH_BLOCK)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                            block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  with jax.ensure_compile_time_eval():  # its mask tables are constants: cached, they must not be a trace's tracers
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, *, interpret: bool = False) -> jax.Array:
  """The splash kernel per example on (heads, length, head_dim); `interpret` runs the Pallas kernel on any
  backend (how the tests check it on CPU)."""
  kernel = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], interpret)
  scaled = q * np.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)
  heads_first = lambda t: t.swapaxes(1, 2)
  out = jax.vmap(kernel)(heads_first(scaled), heads_first(k), heads_first(v))
  return out.swapaxes(1, 2).astype(q.dtype)
