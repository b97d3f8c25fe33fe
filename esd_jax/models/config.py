"""Validation of diffusers/transformers `config.json` files.

Each model declares the fields it implements with their defaults, and the values it supports where a
field has alternatives. A field we do not know, or a value we do not implement, is an error naming it:
a model never silently computes something other than what its config describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Bookkeeping keys written by diffusers/transformers that do not affect the computation.
_METADATA = frozenset({
    '_class_name', '_diffusers_version', '_name_or_path', '_commit_hash', '_use_default_values',
    'transformers_version', 'architectures', 'model_type', 'torch_dtype', 'dtype', 'output_attentions',
    'output_hidden_states', 'return_dict', 'id2label', 'label2id', 'pruned_heads', 'tie_word_embeddings',
    'chunk_size_feed_forward', 'is_encoder_decoder', 'is_decoder', 'add_cross_attention',
    'tie_encoder_decoder', 'problem_type', 'tokenizer_class', 'prefix', 'bos_token_id', 'pad_token_id',
    'eos_token_id', 'sep_token_id', 'decoder_start_token_id', 'task_specific_params', 'finetuning_task',
    'cross_attention_hidden_size', 'use_return_dict', 'torchscript', 'use_bfloat16', 'tf_legacy_loss',
    'attn_implementation', '_attn_implementation_autoset', 'initializer_range', 'initializer_factor',
    'dropout', 'attention_dropout', 'projection_dim_unused', 'output_scores', 'return_dict_in_generate',
})


class ModelConfigError(ValueError):
  pass


class FrozenConfig(dict):
  """A read-only, hashable config dict (nested lists frozen to tuples).

  Models keep their config as static NNX data, so it ends up in the module's GraphDef, which must be
  hashable to serve as a static argument of `jax.jit`. Still a dict, so `json.dumps` writes it as one.
  """

  def __init__(self, items: Mapping[str, Any]):
    super().__init__({k: _freeze(v) for k, v in items.items()})

  def __hash__(self):
    return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

  def _read_only(self, *args, **kwargs):
    raise TypeError('A model config is read-only; build a new model from a changed dict instead.')

  __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only


def read_config(name: str, config: Mapping[str, Any], defaults: Mapping[str, Any],
                supported: Mapping[str, Any] | None = None, *, source: str = 'config.json') -> FrozenConfig:
  """Returns `defaults` overridden by `config`, after checking every field.

  `supported[field]` is either a collection of allowed values or a predicate on the value.
  """
  unknown = sorted(k for k in config if k not in defaults and k not in _METADATA)
  if unknown:
    raise ModelConfigError(f'{source}: {name} has config field(s) {unknown} that esd-jax does not know. '
                      f'Known fields: {sorted(defaults)}. Remove them if they are unused, or file an issue '
                      'to support them.')
  out = {k: config.get(k, v) for k, v in defaults.items()}
  for field, allowed in (supported or {}).items():
    value = out[field]
    ok = allowed(value) if callable(allowed) else _freeze(value) in {_freeze(a) for a in allowed}
    if not ok:
      hint = '' if callable(allowed) else f' Supported: {list(allowed)}.'
      raise ModelConfigError(f'{source}: {name}.{field} = {value!r} is not supported by esd-jax.{hint}')
  return FrozenConfig(out)


def _freeze(value):
  if isinstance(value, Mapping):
    return FrozenConfig(value)
  return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value
