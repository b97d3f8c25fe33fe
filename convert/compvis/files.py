"""Whole CompVis single files: reading (.safetensors; .ckpt/.pt/.pth/.bin with torch) and writing
(.safetensors), with the component prefixes added or stripped and everything else carried as extras.
"""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convert.compvis.configs import CONFIG_METADATA_KEY, stored_configs
from convert.compvis.links import (_COMPONENTS, UNET_PREFIX, LazyTensor, _from_compvis, _show,
                                   _to_compvis)
from esd_jax import files

_TORCH_SUFFIXES = ('.ckpt', '.pt', '.pth', '.bin')
_SAFETENSORS_DTYPES = {code: dtype for dtype, code in files.SAFETENSORS_DTYPES.items()}


def read_safetensors(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
  """Any .safetensors file as (key → LazyTensor, its `__metadata__`), keys as they are in the file."""
  reader = files.SafetensorsReader(path)  # checks the header: garbage, truncated → errors naming the file
  with open(path, 'rb') as f:  # shapes and dtypes, without touching the data
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
  tensors = {}
  for key in reader:
    code = header[key]['dtype']
    if code not in _SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {key!r} has dtype {code}, which esd-jax does not read.')
    tensors[key] = LazyTensor(reader[key], header[key]['shape'], _SAFETENSORS_DTYPES[code])
  return tensors, dict(reader.metadata)


def _read_torch(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
  sd = files.load_torch_checkpoint(path)  # first: it explains a missing torch
  import torch
  return {k: LazyTensor(lambda t=t: files.torch_array(t), t.shape, files.torch_array(t.reshape(-1)[:0]).dtype)
          for k, t in sd.items() if isinstance(t, torch.Tensor)}, {}


def read_single_file(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, Any],
                                                      dict[str, str]]:
  """Reads an SD1/SD2 CompVis single-file checkpoint (.safetensors; .ckpt/.pt when torch is installed).

  Returns (components, extras, metadata): components maps 'unet', 'vae', 'text_encoder' (those present)
  to diffusers-keyed lazy tensors (`LazyTensor`: call for the array, `.shape` without reading); extras
  maps the full CompVis keys of everything else (see the `convert.compvis` docstring) to lazy tensors;
  metadata is the file's safetensors `__metadata__`. Configs: `stored_configs(metadata)` for files we
  wrote, else `infer_configs(components, prediction_type=...)`. The stored configs, when present, also
  drive the key mapping; without them the structure is read off the keys.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: checkpoint file not found.')
  tensors, metadata = (_read_torch if path.suffix in _TORCH_SUFFIXES else read_safetensors)(path)
  if any(k.startswith('conditioner.') for k in tensors):
    raise ValueError(f'{path}: an SDXL single file (conditioner.embedders.*): only SD1/SD2 single files are '
                     'supported. Convert it to the diffusers folder layout first.')
  if not any(k.startswith(UNET_PREFIX) for k in tensors):
    raise ValueError(f'{path}: not a Stable Diffusion checkpoint: it has no {UNET_PREFIX}* tensors (its '
                     f'{len(tensors)} tensors include {_show(tensors, 3)}). Standalone VAEs, LoRAs and '
                     'embeddings are not single-file checkpoints.')
  configs = stored_configs(metadata, source=str(path)) or {}
  parts: dict[str, dict[str, Any]] = defaultdict(dict)
  extras = {}
  for key, value in tensors.items():
    name = next((n for n, c in _COMPONENTS.items() if key.startswith(c.prefix)), None)
    if name is None:
      extras[key] = value
    else:
      parts[name][key.removeprefix(_COMPONENTS[name].prefix)] = value
  components = {}
  for name, part in parts.items():
    components[name], rest = _from_compvis(name, part, configs.get(name), f'{path} ({name})')
    extras.update({_COMPONENTS[name].prefix + k: v for k, v in rest.items()})
  return components, extras, metadata


def write_single_file(path: str | os.PathLike, components: Mapping[str, Mapping[str, Any]],
                      configs: Mapping[str, Mapping[str, Any]], *, dtype=None,
                      extras: Mapping[str, Any] | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes diffusers-keyed `components` ('unet' required; 'vae', 'text_encoder') as one CompVis
  .safetensors file, atomically (a temporary sibling, fsynced, renamed over `path`; removed on failure).

  `configs` holds each component's diffusers config (and optionally 'scheduler'); all of it is stored as
  JSON under the metadata key CONFIG_METADATA_KEY. `extras` (full CompVis keys, e.g. from
  read_single_file) are written as they are; `metadata` adds string metadata entries. `dtype` ('fp16',
  'bf16', 'fp32' or a numpy dtype) converts floating tensors; None keeps each tensor's dtype.
  """
  path = Path(path)
  if path.suffix != '.safetensors':
    raise ValueError(f'{path}: single files are written as .safetensors only; name it *.safetensors.')
  if 'unet' not in components:
    raise ValueError(f'{path}: a single-file checkpoint needs the UNet; components has {sorted(components)}.')
  unknown = sorted(set(components) - set(_COMPONENTS))
  if unknown:
    raise ValueError(f'{path}: unknown component(s) {unknown}; a single file holds {sorted(_COMPONENTS)}.')
  missing = sorted(set(components) - set(configs))
  if missing:
    raise ValueError(f'{path}: no config for component(s) {missing}; pass them in configs.')
  tensors = {}
  for name, sd in components.items():
    prefix = _COMPONENTS[name].prefix
    converted = _to_compvis(name, sd, configs[name], f'{path} ({name})')
    tensors.update((prefix + k, v) for k, v in converted.items())
  clash = sorted(set(tensors) & set(extras or {}))
  if clash:
    raise ValueError(f'{path}: extras {_show(clash)} collide with converted component tensors; drop them '
                     'from the extras (or the component) so each tensor is written once.')
  tensors.update(extras or {})
  tensors = {k: LazyTensor.of(v) for k, v in tensors.items()}  # the writer needs shape and dtype up front
  meta = {**(metadata or {}), CONFIG_METADATA_KEY: json.dumps(configs, sort_keys=True)}
  files.write_safetensors(path, tensors, metadata=meta,
                          dtype=files.np_dtype(dtype) if isinstance(dtype, str) else dtype)
