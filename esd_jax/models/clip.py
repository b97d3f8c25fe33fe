"""transformers' CLIP text encoders: `CLIPTextModel` and `CLIPTextModelWithProjection`.

Built from a `CLIPTextConfig` config.json; parameter paths are the transformers state-dict keys as the
Stable Diffusion checkpoints store them (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...,
`text_projection.weight`). `canonical_keys` maps the other spellings a checkpoint may use onto these.

Input ids are integers, so the compute dtype is an argument of `__call__` (default float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.models import attention
from esd_jax.models.config import ModelConfigError, read_config
from esd_jax.models.layers import Embedding, LayerNorm, Linear, ParamKeys, activation

_DEFAULTS = {
    'vocab_size': 49408,
    'hidden_size': 512,
    'intermediate_size': 2048,
    'projection_dim': 512,
    'num_hidden_layers': 12,
    'num_attention_heads': 8,
    'max_position_embeddings': 77,
    'hidden_act': 'quick_gelu',
    'layer_norm_eps': 1e-5,
    'eos_token_id': 49407,
}

_SUPPORTED = {
    'hidden_act': ('quick_gelu', 'gelu'),
    # The pooled output picks one position per sequence; a list of end tokens has no defined rule.
    'eos_token_id': lambda v: isinstance(v, int),
}

# transformers < 4.31 saved the position-id buffer (an arange) with the weights; later versions do not,
# and ignore it when loading.
_POSITION_IDS = 'embeddings.position_ids'
_PREFIX = 'text_model.'

_V = TypeVar('_V')


def for_vocabulary(config: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
  """A text encoder config sized for a tokenizer of `vocab_size` tokens whose last token is <|endoftext|> (as
  esd_jax.tokenizer writes them)."""
  return {**config, 'vocab_size': vocab_size, 'eos_token_id': vocab_size - 1}


def canonical_keys(tensors: Mapping[str, _V]) -> dict[str, _V]:
  """A CLIP text-encoder checkpoint's tensors under this module's keys.

  Drops the `position_ids` buffer older transformers saved, and adds the `text_model.` prefix that
  transformers 5 leaves out when it saves a `CLIPTextModel` it built itself (it keeps the prefix for one
  loaded from a prefixed file, and always for `CLIPTextModelWithProjection`). Values pass through
  untouched, so lazy readers stay lazy.
  """
  out = {}
  for key, value in tensors.items():
    if not key.startswith((_PREFIX, 'text_projection.')):
      key = _PREFIX + key
    if key != _PREFIX + _POSITION_IDS:
      out[key] = value
  return out


class CLIPTextOutput(NamedTuple):
  """What the text encoders return (a pytree, so it passes through `jit`).

  `hidden_states` is transformers' `output_hidden_states=True` tuple: the embeddings, then each layer's
  output; `hidden_states[-2]` is SDXL's penultimate state (no final layer norm). `last_hidden_state` is
  the last layer's output after the final layer norm. `pooler_output` is that normalised state at each
  sequence's end token. `text_embeds` is the projected pooled output (CLIPTextModelWithProjection only).
  """

  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple[jax.Array, ...]
  text_embeds: jax.Array | None = None


class CLIPAttention(nnx.Module):
  """Multi-head causal self-attention (q/k/v/out projections with biases); `attention_implementation` as in
  layers.Attention."""

  attention_implementation = 'xla'

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.q_proj = Linear(dim, dim, rngs=rngs)
    self.k_proj = Linear(dim, dim, rngs=rngs)
    self.v_proj = Linear(dim, dim, rngs=rngs)
    self.out_proj = Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # (B, T, N, H)
    y = attention.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                        implementation=self.attention_implementation, is_causal=True)
    return self.out_proj(y.reshape(*x.shape))


class CLIPMLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs):
    self.act = activation(act)
    self.fc1 = Linear(dim, hidden, rngs=rngs)
    self.fc2 = Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, c: Mapping[str, Any], *, rngs: nnx.Rngs):
    dim, eps = c['hidden_size'], c['layer_norm_eps']
    self.self_attn = CLIPAttention(dim, c['num_attention_heads'], rngs=rngs)
    self.layer_norm1 = LayerNorm(dim, eps=eps)
    self.mlp = CLIPMLP(dim, c['intermediate_size'], c['hidden_act'], rngs=rngs)
    self.layer_norm2 = LayerNorm(dim, eps=eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  def __init__(self, c: Mapping[str, Any], *, rngs: nnx.Rngs):
    self.layers = nnx.List([CLIPEncoderLayer(c, rngs=rngs) for _ in range(c['num_hidden_layers'])])


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, c: Mapping[str, Any], *, rngs: nnx.Rngs):
    self.token_embedding = Embedding(c['vocab_size'], c['hidden_size'], rngs=rngs)
    self.position_embedding = Embedding(c['max_position_embeddings'], c['hidden_size'], rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length, limit = input_ids.shape[-1], self.position_embedding.weight.shape[0]
    if length > limit:
      raise ValueError(f'CLIP text encoder: {length} tokens exceed max_position_embeddings = {limit}; '
                       'truncate the prompt (the tokenizer does with truncation=True).')
    return self.token_embedding(input_ids) + self.position_embedding.weight[...][:length]


class CLIPTextTransformer(nnx.Module):
  """Embeddings, causal encoder and final layer norm; returns a CLIPTextOutput."""

  def __init__(self, c: Mapping[str, Any], *, rngs: nnx.Rngs):
    self.embeddings = CLIPTextEmbeddings(c, rngs=rngs)
    self.encoder = CLIPEncoder(c, rngs=rngs)
    self.final_layer_norm = LayerNorm(c['hidden_size'], eps=c['layer_norm_eps'])
    self.eos_token_id = c['eos_token_id']

  def __call__(self, input_ids: jax.Array, dtype: jnp.dtype) -> CLIPTextOutput:
    h = self.embeddings(input_ids).astype(dtype)
    hidden_states = [h]
    for layer in self.encoder.layers:
      h = layer(h)
      hidden_states.append(h)
    last = self.final_layer_norm(h)
    # transformers' rule. Configs written before its PR #24773 carry eos_token_id = 2 (wrong): for those
    # it takes the position of the largest id, which is the end token in CLIP's vocabulary; otherwise
    # the first occurrence of eos_token_id (padding may repeat it).
    if self.eos_token_id == 2:
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last, pooled, tuple(hidden_states))


def _read(name: str, config: Mapping[str, Any], source: str, **supported) -> dict[str, Any]:
  c = read_config(name, config, _DEFAULTS, {**_SUPPORTED, **supported}, source=source)
  if c['hidden_size'] % c['num_attention_heads']:
    raise ModelConfigError(f'{source}: {name}.hidden_size = {c["hidden_size"]} is not a multiple of '
                      f'num_attention_heads = {c["num_attention_heads"]}.')
  return c


class CLIPTextModel(nnx.Module):
  """transformers' CLIPTextModel (SD 1.x/2.x text encoder, SDXL's first)."""

  def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, source: str = 'config.json'):
    self.config = _read('CLIPTextModel', config, source)
    rngs = ParamKeys(rngs)
    self.text_model = CLIPTextTransformer(self.config, rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, dtype: jnp.dtype = jnp.float32) -> CLIPTextOutput:
    """`input_ids` (B, T) integers, T ≤ max_position_embeddings."""
    return self.text_model(input_ids, dtype)


class CLIPTextModelWithProjection(nnx.Module):
  """transformers' CLIPTextModelWithProjection (SDXL's second text encoder): adds `text_embeds`."""

  def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, source: str = 'config.json'):
    self.config = _read('CLIPTextModelWithProjection', config, source,
                        projection_dim=lambda v: isinstance(v, int) and v > 0)
    rngs = ParamKeys(rngs)
    self.text_model = CLIPTextTransformer(self.config, rngs=rngs)
    self.text_projection = Linear(self.config['hidden_size'], self.config['projection_dim'], bias=False,
                                  rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, dtype: jnp.dtype = jnp.float32) -> CLIPTextOutput:
    """`input_ids` (B, T) integers, T ≤ max_position_embeddings."""
    out = self.text_model(input_ids, dtype)
    return out._replace(text_embeds=self.text_projection(out.pooler_output))
