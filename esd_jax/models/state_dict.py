"""Flat state dicts: the bridge between NNX modules and checkpoint files.

A parameter's key is its NNX path joined by '.', which by construction (see layers.py) is the
diffusers/transformers state-dict key. Loading fills an abstract module (built with `nnx.eval_shape`, so
no memory is spent on initial values) tensor by tensor, each placed straight on its device or sharding.

Two layouts, one difference: convolution kernels are *stored* OIHW (PyTorch's, in every file and in the tensor
dicts the exporters take) and *held* HWIO in modules (what XLA convolves with: an OIHW kernel costs a transposed
copy of every kernel per step, held through the sampler's loop). `state_dict`, `param_shapes` and
`load_state_dict` speak the stored layout; `split_flat` gives the held one (what the jitted steps train).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from esd_jax import distributed
from esd_jax.files import LazyTensor


_TO_STORED, _TO_HELD = (3, 2, 0, 1), (2, 3, 1, 0)  # HWIO → OIHW, OIHW → HWIO


def _relayout(value, axes: tuple[int, ...], stacked: int):
  if value.ndim - stacked != len(axes):
    return value
  return value.transpose(*range(stacked), *(stacked + a for a in axes))


def stored(value, *, stacked: int = 0):
  """A held parameter in its stored (checkpoint) layout; `stacked`: leading axes that are not the parameter's
  (separate models' stacked tensors)."""
  return _relayout(value, _TO_STORED, stacked)


def held(value, *, stacked: int = 0):
  """A stored parameter in the layout modules hold (the inverse of `stored`)."""
  return _relayout(value, _TO_HELD, stacked)


def stored_tensors(tensors: Mapping[str, Any], *, stacked: int = 0) -> dict[str, Any]:
  return {k: stored(v, stacked=stacked) for k, v in tensors.items()}


def stored_shape(shape: Iterable[int]) -> tuple[int, ...]:
  shape = tuple(shape)
  return tuple(shape[a] for a in _TO_STORED) if len(shape) == len(_TO_STORED) else shape


def key_of(path: Iterable[Any]) -> str:
  return '.'.join(str(p) for p in path)


def param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Key → stored shape of every parameter (works on abstract modules too)."""
  return {key_of(p): stored_shape(v.shape) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def state_dict(module: nnx.Module) -> dict[str, Any]:
  """Key → array of every parameter, in the checkpoint's names and layout: the held arrays themselves, except
  convolution kernels, which are `LazyTensor`s laid out on the host when read (np.asarray). A writer thus holds
  one kernel's stored copy at a time, never a second copy of every kernel (1.5 GB for SD 1.4) on the device."""
  def entry(value):
    if value.ndim != len(_TO_STORED):
      return value
    return LazyTensor(lambda: stored(np.asarray(value)), stored_shape(value.shape), value.dtype)
  return {key_of(p): entry(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """A module's structure without its values: rebuilds the module from a flat {key: array} dict.

  Static and hashable, so a jitted function can take parameters as plain flat dicts (the frozen base
  held once, a trained subset laid over it) and call the module inside.
  """

  graphdef: Any
  paths: tuple[tuple[str, tuple[Any, ...]], ...]

  def module(self, params: Mapping[str, jax.Array]) -> nnx.Module:
    path = dict(self.paths)
    return nnx.merge(self.graphdef, nnx.from_flat_state([(path[k], v) for k, v in params.items()]))


def split_flat(module: nnx.Module) -> tuple[ParamLayout, dict[str, jax.Array]]:
  """(layout, {key: array}) of a module whose state is all parameters (ShapeDtypeStructs for an abstract one), in
  the held layout."""
  graphdef, state = nnx.split(module)
  flat = nnx.to_flat_state(state)
  if any(not isinstance(v, nnx.Param) for _, v in flat):
    raise TypeError(f'{type(module).__name__} holds state other than parameters; split_flat expects only nnx.Param.')
  return (ParamLayout(graphdef, tuple((key_of(p), tuple(p)) for p, _ in flat)),
          {key_of(p): v.get_value() for p, v in flat})


def abstract(build: Callable[[], nnx.Module]) -> nnx.Module:
  """The module `build()` would return, with shapes only: no parameter memory is allocated."""
  return nnx.eval_shape(build)


def load_state_dict(module: nnx.Module, tensors: Mapping[str, Any], *, source: str = 'state dict',
                    sharding: Callable[[str, tuple[int, ...]], Any] | None = None,
                    strict: bool = True) -> nnx.Module:
  """Fills `module` (abstract or concrete) from `tensors`, in place, and returns it.

  `tensors` maps keys to arrays in the stored layout, or to zero-argument callables returning one (lazy readers,
  so a large file is never held twice). Each tensor is checked for shape, converted to the parameter's dtype and
  held layout and put on `sharding(key, held shape)` (each process its own shards; default device when None). With
  `strict`, missing and unexpected keys are errors that name `source`.
  """
  state = nnx.state(module, nnx.Param)
  flat = nnx.to_flat_state(state)
  expected = {key_of(p) for p, _ in flat}
  missing = sorted(expected - set(tensors))
  unexpected = sorted(set(tensors) - expected)
  if strict and (missing or unexpected):
    raise KeyError(_mismatch_message(source, missing, unexpected))
  for path, var in flat:
    key = key_of(path)
    if key not in tensors:
      continue
    value = tensors[key]
    value = np.asarray(value() if callable(value) else value)
    if tuple(value.shape) != stored_shape(var.shape):
      raise ValueError(f'{source}: tensor {key!r} has shape {tuple(value.shape)}, but the model built '
                       f'from its config expects {stored_shape(var.shape)}. The weights and config.json do not '
                       'belong together.')
    value = held(value.astype(var.dtype, copy=False))
    var.set_value(distributed.put(value, sharding(key, value.shape) if sharding else None))
  nnx.update(module, state)
  return module


def _mismatch_message(source: str, missing: list[str], unexpected: list[str]) -> str:
  def show(keys):
    return ', '.join(keys[:8]) + (f' … ({len(keys)} in all)' if len(keys) > 8 else '')
  parts = [f'{source}: the tensors do not match the model built from its config.']
  if missing:
    parts.append(f'Missing: {show(missing)}.')
  if unexpected:
    parts.append(f'Unexpected: {show(unexpected)}.')
  parts.append('Check that the weights and config.json come from the same model.')
  return ' '.join(parts)
