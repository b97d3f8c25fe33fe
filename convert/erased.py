"""Erased models for the PyTorch world: the base pipeline with the trained tensors laid over its UNet,
written in the formats ESD users load.

| format        | what                                                        | loads with                            |
|---------------|-------------------------------------------------------------|---------------------------------------|
| `diffusers`   | the whole pipeline folder                                   | StableDiffusionPipeline.from_pretrained |
| `unet`        | the UNet component folder                                   | UNet2DConditionModel.from_pretrained  |
| `trained`     | only the trained tensors, diffusers keys (the 2025 code's)  | unet.load_state_dict(load_file(p), strict=False) |
| `single_file` | one CompVis checkpoint (UNet + VAE + text encoder)          | A1111, ComfyUI, from_single_file      |

The `trained` file holds only the given tensors that differ from the base UNet's (compared exactly, after
casting to the base tensor's dtype), so weights that hold the whole UNet (the released full-UNet `.pt`, the
paper's CompVis checkpoints) export only what the erasure changed; its metadata records how many tensors were
given and how many were kept (TENSORS_GIVEN_KEY, TENSORS_KEPT_KEY).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from convert.diffusers_format import save_component, save_pipeline
from convert.esd_weights import apply_esd_weights, write_trained_safetensors
from convert.single_file import save_single_file
from esd_jax.files import write_json
from esd_jax.models.state_dict import split_flat, stored
from esd_jax.pipeline import StableDiffusion

FORMATS = ('diffusers', 'unet', 'trained', 'single_file')
# Where each format lands inside the export folder.
OUTPUTS = {'diffusers': 'pipeline', 'unet': 'unet', 'trained': 'unet_trained.safetensors',
           'single_file': 'model.safetensors'}
# Metadata of the `trained` file: how many tensors the weights held, and how many differ from the base (written).
TENSORS_GIVEN_KEY = 'esd_jax.tensors_given'
TENSORS_KEPT_KEY = 'esd_jax.tensors_kept'


def erased_pipeline(pipe: StableDiffusion, trained: Mapping[str, Any], *, source: str | None = None):
  """A copy of `pipe` whose UNet has `trained` laid over it; `pipe` itself is unchanged. Errors name `source`
  (default: the weights' own `source`, as read_esd_weights sets it, else 'trained tensors')."""
  source = source or getattr(trained, 'source', 'trained tensors')
  return dataclasses.replace(pipe, unet=apply_esd_weights(nnx.clone(pipe.unet), trained, source=source))


def differing_tensors(unet: nnx.Module, trained: Mapping[str, Any], source: str = 'trained tensors'
                      ) -> dict[str, Any]:
  """The entries of `trained` whose tensor differs from `unet`'s tensor of the same key, as given (lazy values
  stay lazy). Each is compared exactly after casting to the base tensor's dtype (the dtype it takes when
  applied), one tensor at a time on the host, so no second UNet is ever held."""
  base = split_flat(unet)[1]  # references to the held parameters; each compared one is laid out on the host
  unknown = sorted(set(trained) - set(base))
  if unknown:
    raise ValueError(f'{source}: {len(unknown)} tensor(s) are not parameters of the base UNet (e.g. {unknown[:3]}): '
                     'the weights belong to another model architecture.')
  kept = {}
  for key, value in trained.items():
    reference = stored(np.asarray(base[key]))
    given = np.asarray(value() if callable(value) else value)
    if given.shape != reference.shape or not np.array_equal(given.astype(reference.dtype, copy=False), reference):
      kept[key] = value
  return kept


def write_erased(pipe: StableDiffusion, trained: Mapping[str, Any], folder: str | os.PathLike,
                 formats: Sequence[str] = FORMATS, *, dtype: str | None = None,
                 metadata: Mapping[str, Any] | None = None) -> dict[str, Path]:
  """Writes the erased model in each of `formats` under `folder`; returns format → path.

  The `trained` format writes only the tensors that differ from `pipe`'s UNet; weights that equal it
  throughout are a ValueError (naming their `source`), raised before anything is written.
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ValueError(f'Unknown export format(s) {unknown or list(formats)}; choose from {list(FORMATS)}.')
  folder = Path(folder)
  source = getattr(trained, 'source', 'trained tensors')
  # The whole erased UNet only for the formats that hold it: a `trained` export costs only the trained tensors.
  erased = erased_pipeline(pipe, trained, source=source) if set(formats) - {'trained'} else None
  if 'trained' in formats:  # before anything is written: an error leaves no partial export
    kept = differing_tensors(pipe.unet, trained, source)
    if not kept:
      raise ValueError(f'{source}: all {len(trained)} tensor(s) equal the base model\'s, so nothing was erased '
                       'and there are no trained tensors to export. The unet, diffusers and single_file formats '
                       'write the model as it is.')
  paths = {f: folder / OUTPUTS[f] for f in formats}
  for fmt, path in paths.items():
    if fmt == 'diffusers':
      save_pipeline(erased, path, dtype=dtype)
    elif fmt == 'unet':
      save_component(erased.unet, path, dtype=dtype)
    elif fmt == 'trained':
      write_trained_safetensors(path, kept, dtype=dtype,
                                metadata={'esd_jax.run': json.dumps(dict(metadata or {}), sort_keys=True),
                                          TENSORS_GIVEN_KEY: len(trained), TENSORS_KEPT_KEY: len(kept)})
    else:
      save_single_file(erased, path, dtype=dtype)
  return paths


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def write_erased_models(pipe: StableDiffusion, models: Sequence[tuple[str, Mapping[str, Any], Mapping[str, Any]]],
                        folder: str | os.PathLike, formats: Sequence[str] = FORMATS, *, dtype: str | None = None,
                        metadata: Mapping[str, Any] | None = None,
                        failed: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
  """Writes several erased models of one base, each in `formats` under folder/NAME, and folder/manifest.json.

  `models` holds (name, description, trained tensors); the description (concept, erase_from, η, …) goes
  into the manifest with the files written and their SHA-256. `failed` lists models that produced nothing
  (with why), so the manifest accounts for every model of the run. With formats=('trained',) a model costs
  only its trained tensors (e.g. ESD-x: the cross-attention K/V projections), not a UNet.
  """
  folder = Path(folder)
  entries = []
  for name, description, trained in models:
    paths = write_erased(pipe, trained, folder / name, formats, dtype=dtype,
                         metadata={**(metadata or {}), **description})
    files = sorted(p for path in paths.values() for p in ([path] if path.is_file() else path.rglob('*'))
                   if p.is_file())
    entries.append({**description, 'name': name, 'status': 'done',
                    'formats': {fmt: str(path.relative_to(folder)) for fmt, path in paths.items()},
                    'sha256': {str(p.relative_to(folder)): _sha256(p) for p in files}})
  manifest = {'run': dict(metadata or {}), 'models': entries + [{**f, 'status': 'failed'} for f in failed]}
  write_json(folder / 'manifest.json', manifest)
  return manifest
