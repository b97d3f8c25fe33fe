"""The attention implementations (esd_jax/models/attention.py) against PyTorch's scaled_dot_product_attention,
forward and backward; the UNet with chunked attention against diffusers; what chunking saves; clear refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esd_jax.models import attention
from tests.reference import nchw, nhwc, rel_err
from tests.test_unet import CASES, _apply, _inputs, _pair


def _qkv(batch, q_len, kv_len, heads, dim, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((batch, n, heads, dim)).astype(np.float32) for n in (q_len, kv_len, kv_len)]


def _torch_attention(q, k, v, causal):
  """Output and (dq, dk, dv) of sum(out · w) in PyTorch, from (B, T, N, H) arrays."""
  with torch.enable_grad():
    return _torch_attention_with_grad(q, k, v, causal)


def _torch_attention_with_grad(q, k, v, causal):
  leaves = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
  tq, tk, tv = (t.transpose(1, 2) for t in leaves)  # PyTorch's (B, N, T, H)
  out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).transpose(1, 2)
  w = torch.from_numpy(np.cos(np.arange(out.numel(), dtype=np.float32)).reshape(out.shape))
  (out * w).sum().backward()
  return out.detach().numpy(), [t.grad.numpy() for t in leaves], w.numpy()


def _ours(fn, q, k, v, w):
  out, grads = jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
  return jax.jit(fn)(q, k, v), grads


# (batch, query length, key length, heads, head_dim, causal): self-attention with lengths that do not divide
# into blocks, cross-attention over 77 tokens, CLIP's causal self-attention.
SHAPES = [(2, 300, 300, 4, 8, False), (1, 257, 77, 2, 16, False), (2, 77, 77, 3, 8, True)]


@pytest.mark.parametrize('implementation', ['xla', 'chunked'])
@pytest.mark.parametrize('shape', SHAPES, ids=['self', 'cross', 'causal'])
def test_matches_torch_forward_and_backward(implementation, shape, monkeypatch):
  # A small block budget, so that chunked splits every case above into several blocks (and pads the last).
  monkeypatch.setattr(attention, '_CHUNK_SCORES', 64 * 77 * 4)
  *dims, causal = shape
  q, k, v = _qkv(*dims)
  want, want_grads, w = _torch_attention(q, k, v, causal)
  fn = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=implementation, is_causal=causal)
  got, grads = _ours(fn, q, k, v, w)
  assert rel_err(got, want) <= 1e-5
  for g, want_g in zip(grads, want_grads):
    assert rel_err(g, want_g) <= 1e-5


def test_splash_kernel_matches_torch_in_interpret_mode():
  # The Pallas TPU kernel itself, interpreted on CPU: 256 queries over 384 keys, blocks of 128 (gcd with 512).
  q, k, v = _qkv(2, 256, 384, 2, 64)
  want, want_grads, w = _torch_attention(q, k, v, False)
  got, grads = _ours(lambda q, k, v: attention._splash(q, k, v, interpret=True), q, k, v, w)
  assert rel_err(got, want) <= 1e-5
  for g, want_g in zip(grads, want_grads):
    assert rel_err(g, want_g) <= 1e-4


@pytest.mark.parity
def test_unet_with_chunked_attention_matches_diffusers(monkeypatch):
  monkeypatch.setattr(attention, '_CHUNK_SCORES', 16 * 64)
  name, config, size, timesteps, pooled = CASES[0]
  ref, ours = _pair(config)
  attention.use(ours, 'chunked')
  sample, context, added = _inputs(config, size, pooled)
  want = ref(torch.from_numpy(nchw(sample)), torch.as_tensor(timesteps), torch.from_numpy(context)).sample
  assert rel_err(_apply(ours, sample, jnp.asarray(timesteps), context, added), nhwc(want)) <= 1e-4


def _temporary_bytes(implementation: str, length: int) -> int:
  q, k, v = (jax.ShapeDtypeStruct((1, length, 8, 40), jnp.float32) for _ in range(3))
  loss = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=implementation).sum()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_never_holds_the_whole_score_matrix():
  # 4096 tokens, 8 heads (SD's 64×64 latents): the fp32 scores alone are 512 MiB; chunked's blocks are 16 MiB.
  scores = 4096 * 4096 * 8 * 4
  assert _temporary_bytes('xla', 4096) >= scores
  assert _temporary_bytes('chunked', 4096) <= scores / 4


def test_unknown_or_unavailable_implementations_are_refused():
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'; choose one of auto, xla"):
    attention.check('flash')
  with pytest.raises(attention.AttentionUnavailableError, match="runs on GPU only, and this backend is 'cpu'"):
    attention.check('cudnn', 'cpu')
  with pytest.raises(attention.AttentionUnavailableError, match="runs on TPU only, and this backend is 'gpu'"):
    attention.check('splash', 'gpu')
  attention.check('splash', 'tpu')
  q = jnp.zeros((1, 8, 2, 8), jnp.float32)
  with pytest.raises(attention.AttentionUnavailableError, match="runs on GPU only, and this backend is 'cpu'"):
    attention.dot_product_attention(q, q, q, implementation='cudnn')


def test_cudnn_refuses_float32(monkeypatch):
  # What a float32 run asking for cuDNN on a GPU is told (the backend check passed as it would there).
  monkeypatch.setattr(attention, 'check', lambda implementation, backend=None: None)
  q = jnp.zeros((1, 8, 2, 8), jnp.float32)
  with pytest.raises(attention.AttentionUnavailableError, match='computes in bfloat16 or float16'):
    attention.dot_product_attention(q, q, q, implementation='cudnn')


def test_use_sets_every_attention_layer():
  from esd_jax import tiny
  from esd_jax.models import build_abstract
  from flax import nnx
  unet = build_abstract(tiny.UNET)
  attention.use(unet, 'chunked')
  layers = [m for _, m in nnx.iter_modules(unet) if hasattr(m, 'attention_implementation')]
  assert len(layers) >= 4 and {m.attention_implementation for m in layers} == {'chunked'}
