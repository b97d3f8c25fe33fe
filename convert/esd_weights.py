"""ESD weight files as the authors' code writes them ⇄ esd-jax UNets.

Three formats are in users' hands (all diffusers UNet2DConditionModel key names):

  * 'pt' — the released weights, `diffusers-{Concept}-ESD{x|u}{η}-UNET.pt`:
    `torch.save(unet.state_dict())`, the full UNet state dict, fp32. A `.pt` whose dict sits under
    'state_dict' is read the same way.
  * 'safetensors' — the 2025 code (esd_sd.py, esd_sdxl.py): `save_file({name: param})` of only the trained
    tensors, loaded with `unet.load_state_dict(load_file(path), strict=False)`. It trains in bf16, so the
    tensors usually are bf16; it writes no metadata.
  * 'demo' — the first diffusers port (esd_diffusers.py with utils/utils.py's FineTunedModel, the line of
    the web demo): `torch.save(finetuner.state_dict())`, that state dict being
    `{module_name: module.state_dict()}` over the trained Linear/Conv2d modules. Module names are those of
    `StableDiffuser.named_modules()`, so they carry the `unet.` prefix
    (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`), and each inner dict is torch's
    OrderedDict with 'weight' and, only where the layer has one, 'bias': SD's attention to_q/to_k/to_v
    have no bias, and the key is then absent (not None).

A `.pt` or `.safetensors` in the CompVis layout (`model.diffusion_model.*`, as the paper's CompVis code saves
whole models) is read too, through the single-file reader, and yields its UNet.

Reading returns diffusers-keyed lazy tensors (`convert.compvis.LazyTensor`: shape and dtype known without
reading); `apply_esd_weights` overlays them, possibly a subset, onto a loaded base UNet. torch is imported
only for the pickled formats.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from convert import compvis
from convert.compvis import LazyTensor
from esd_jax import files
from esd_jax.files import atomic_path, np_dtype, write_safetensors
from esd_jax.models.state_dict import key_of, load_state_dict, param_shapes, state_dict

# The top-level modules of a diffusers UNet2DConditionModel as esd-jax builds it.
_UNET_ROOTS = frozenset({'conv_in', 'time_embedding', 'add_embedding', 'down_blocks', 'mid_block',
                         'up_blocks', 'conv_norm_out', 'conv_out'})
_DEMO_PREFIX = 'unet.'  # FineTunedModel names modules as StableDiffuser.named_modules() does
_DEMO_PARAMS = ('weight', 'bias')  # what Linear/Conv2d.state_dict() holds, weight first


class EsdWeights(dict):
  """Diffusers-keyed UNet tensors read from an ESD weights file: key → LazyTensor.

  `format` is 'pt', 'safetensors', 'demo' or 'compvis' (see the module docstring); `metadata` is the
  safetensors `__metadata__` ({} for pickles); `source` names the file, for error messages.
  """

  def __init__(self, tensors: Mapping[str, Any], *, format: str, source: str,
               metadata: Mapping[str, str] | None = None):
    super().__init__(tensors)
    self.format = format
    self.source = source
    self.metadata = dict(metadata or {})


def read_esd_weights(path: str | os.PathLike) -> EsdWeights:
  """Reads ESD weights in any of the authors' formats (detected from the file's content, not its name)
  as diffusers-keyed lazy UNet tensors: all of the UNet's tensors or only the trained ones."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: ESD weights file not found.')
  metadata: dict[str, str] = {}
  if files.is_torch_file(path):
    tensors, kind = _read_torch(path)
  else:
    try:
      tensors, metadata = compvis.read_safetensors(path)
    except ValueError as e:
      raise ValueError(f'{path}: not a checkpoint: neither a PyTorch file (zip archive or legacy pickle) '
                       'nor a readable safetensors file. It is corrupt or truncated (an interrupted '
                       'download?), or not a weights file.') from e
    kind = 'safetensors'
  if any(k.startswith(compvis.UNET_PREFIX) for k in tensors):
    # A whole CompVis-layout model: the single-file reader maps its UNet and knows the other components.
    return EsdWeights(compvis.read_single_file(path)[0]['unet'], format='compvis', source=str(path),
                      metadata=metadata)
  check_unet_keys(tensors, str(path))
  return EsdWeights(tensors, format=kind, source=str(path), metadata=metadata)


def apply_esd_weights(unet: nnx.Module, tensors: Mapping[str, Any], *,
                      source: str | None = None) -> nnx.Module:
  """Overlays `tensors` (diffusers keys → arrays, LazyTensors or zero-argument callables; all of the
  UNet's tensors or a subset) onto `unet` in place, and returns it.

  Typical use: load the base SD pipeline, then `apply_esd_weights(pipe.unet, read_esd_weights(path))`.
  Keys the UNet lacks and shape mismatches are errors that leave `unet` untouched (shapes are checked up
  front wherever the value knows its shape, as everything read_esd_weights returns does). A subset can
  only be applied to a UNet that has weights (not to an abstract one). Each new value takes the dtype and
  sharding of the parameter it replaces.
  """
  source = source or getattr(tensors, 'source', 'ESD weights')
  params = {key_of(p): v for p, v in nnx.to_flat_state(nnx.state(unet, nnx.Param))}
  if not tensors:
    raise ValueError(f'{source}: holds no tensors to apply.')
  unknown = sorted(set(tensors) - set(params))
  if unknown:
    raise KeyError(f'{source}: {len(unknown)} tensor(s) have no counterpart in this UNet: {_show(unknown)}. '
                   'ESD weights only fit the base model they were trained from (SD 1.x, 2.x or XL): load '
                   'that model first.')
  shapes = param_shapes(unet)
  wrong = [f'{k} {tuple(v.shape)} (the UNet has {shapes[k]})' for k, v in tensors.items()
           if hasattr(v, 'shape') and tuple(v.shape) != shapes[k]]
  if wrong:
    raise ValueError(f'{source}: {len(wrong)} tensor(s) do not fit this UNet\'s shapes: {_show(wrong, 4)}. '
                     'ESD weights only fit the base model they were trained from: load that model first.')
  abstract = [k for k, v in params.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if abstract and set(abstract) - set(tensors):
    raise ValueError(f'{source}: holds {len(tensors)} of the UNet\'s {len(params)} tensors, but the UNet has '
                     'no weights yet (it was built abstractly): load the base model first, then apply these.')

  def sharding(key, shape):
    # Placed as the value it replaces; an uncommitted one stays uncommitted, or jitted callers would retrace.
    value = params[key].get_value()
    return value.sharding if isinstance(value, jax.Array) and value.committed else None
  return load_state_dict(unet, tensors, source=source, sharding=sharding, strict=False)


def check_unet_keys(keys, source: str) -> None:
  """Raises naming `source` unless `keys` are diffusers UNet2DConditionModel parameter keys."""
  keys = list(keys)
  if not keys:
    raise ValueError(f'{source}: holds no tensors.')
  bad = [k for k in keys if k.split('.', 1)[0] not in _UNET_ROOTS]
  if not bad:
    return
  hint = ''
  if any(k.startswith('text_model.') or k.startswith('encoder.') or k.startswith('decoder.') for k in bad):
    hint = ' They look like a text encoder or VAE, not a UNet.'
  elif any('lora' in k for k in bad):
    hint = ' They look like LoRA weights: merge them into the UNet first.'
  elif any(k.startswith(_DEMO_PREFIX) for k in bad):
    hint = ' They carry a "unet." prefix: a whole-pipeline state dict? Keep the UNet\'s entries, without it.'
  raise ValueError(f'{source}: {len(bad)} of {len(keys)} key(s) are not diffusers UNet keys: {_show(bad)}. '
                   f'ESD weights name UNet tensors as diffusers does ({", ".join(sorted(_UNET_ROOTS))}).'
                   + hint)


# ----------------------------------------------------------------------------------------------------
# Writing, in each of the authors' formats.


def write_trained_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], *, dtype=None,
                              metadata: Mapping[str, Any] | None = None) -> None:
  """The 2025 code's format: only the trained tensors, diffusers keys, one .safetensors file (atomically).

  `dtype` ('fp32', 'fp16', 'bf16' or a numpy dtype) converts floating tensors; None keeps each tensor's.
  `metadata` (e.g. method, concept, eta) is stored as strings in `__metadata__`; `load_file` ignores it.
  """
  path = Path(path)
  if path.suffix != '.safetensors':
    raise ValueError(f'{path}: this format is a .safetensors file; name it *.safetensors.')
  check_unet_keys(tensors, str(path))
  write_safetensors(path, {k: LazyTensor.of(v) for k, v in tensors.items()}, metadata=metadata,
                    dtype=_dtype(dtype))


def write_demo_pt(path: str | os.PathLike, tensors: Mapping[str, Any], *, dtype=None) -> None:
  """The demo line's format: `{'unet.<module>': OrderedDict(weight=..., bias=...)}` pickled with torch.save
  (atomically), exactly what FineTunedModel.state_dict() gives. Needs torch.

  Every key must end in '.weight' or '.bias' (the trained modules are Linear/Conv2d layers); a module
  without a bias gets no 'bias' entry, as torch writes it.
  """
  path = Path(path)
  torch = _import_torch(path, 'Writing the demo format')
  check_unet_keys(tensors, str(path))
  odd = [k for k in tensors if k.rpartition('.')[2] not in _DEMO_PARAMS]
  if odd:
    raise ValueError(f'{path}: the demo format stores whole Linear/Conv2d modules (weight, bias); these keys '
                     f'are not a module\'s weight or bias: {_show(odd)}.')
  modules: dict[str, OrderedDict] = OrderedDict()
  for key in sorted(tensors, key=lambda k: k.endswith('.bias')):  # stable: weights first, as torch lists them
    module, _, name = key.rpartition('.')
    modules.setdefault(_DEMO_PREFIX + module, OrderedDict())[name] = _to_torch(torch, tensors[key], dtype)
  _save_torch(torch, path, modules)


def write_full_pt(path: str | os.PathLike, unet_state_dict: Mapping[str, Any] | nnx.Module, *,
                  dtype=None) -> None:
  """The released weights' format: the full UNet state dict pickled with torch.save (atomically), which
  `UNet2DConditionModel.load_state_dict(torch.load(path))` loads. Accepts our UNet itself too. Needs torch;
  the whole state dict is held in host memory while it is written, as torch.save requires."""
  path = Path(path)
  torch = _import_torch(path, 'Writing a .pt state dict')
  tensors = state_dict(unet_state_dict) if isinstance(unet_state_dict, nnx.Module) else unet_state_dict
  check_unet_keys(tensors, str(path))
  _save_torch(torch, path, OrderedDict((k, _to_torch(torch, v, dtype)) for k, v in tensors.items()))


# ----------------------------------------------------------------------------------------------------
# torch plumbing.


def _import_torch(path: Path, what: str):
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{path}: {what} needs PyTorch (pip install torch); the .safetensors format does not '
                      '(convert the file with a machine that has torch).') from e
  return torch


def _read_torch(path: Path) -> tuple[dict[str, LazyTensor], str]:
  """A pickled state dict, flat ('pt') or nested by module ('demo'), as flat diffusers-keyed tensors."""
  obj = files.load_torch_checkpoint(path)  # first: it explains a missing torch
  import torch
  flat, nested, other = {}, {}, []
  for key, value in obj.items():
    if isinstance(value, torch.Tensor):
      flat[key] = _lazy(value)
    elif isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
      module = key.removeprefix(_DEMO_PREFIX)
      nested.update({f'{module}.{name}': _lazy(t) for name, t in value.items()})
    else:
      other.append(key)
  if other or (flat and nested):
    raise ValueError(f'{path}: not an ESD weights file: a state dict holds tensors (or, in the demo format, '
                     'dicts of tensors per module), but '
                     + (f'these entries are neither: {_show(other)}.' if other else
                        'this one mixes tensors with dicts of tensors.'))
  return (nested, 'demo') if nested else (flat, 'pt')


def _lazy(t) -> LazyTensor:
  """A torch tensor as a LazyTensor: converted to numpy only when read (bf16 through ml_dtypes)."""
  dtype = files.torch_array(t.reshape(-1)[:0]).dtype
  return LazyTensor(lambda: files.torch_array(t), tuple(t.shape), dtype)


def _dtype(dtype):
  return np_dtype(dtype) if isinstance(dtype, str) else dtype


def _to_torch(torch, value, dtype):
  """A host copy of one tensor as a torch tensor; floating tensors converted to `dtype` when given."""
  array = np.asarray(value() if callable(value) else value)
  floating = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
  if dtype is not None and floating:
    array = array.astype(_dtype(dtype))
  array = np.array(array, copy=True, order='C')  # torch wants writable, contiguous memory it may own
  if array.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16: hand torch the bits
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def _save_torch(torch, path: Path, obj) -> None:
  if path.suffix == '.safetensors':
    raise ValueError(f'{path}: this format is a pickled PyTorch file, not safetensors; name it *.pt.')
  with atomic_path(path) as tmp:
    torch.save(obj, tmp)


def _show(items, n: int = 6) -> str:
  items = [str(i) for i in items]
  return ', '.join(items[:n]) + (f' … ({len(items)} in all)' if len(items) > n else '')
