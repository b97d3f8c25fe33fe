"""Erased models for the PyTorch world: the base pipeline with the trained tensors laid over its UNet,
written in the formats ESD users load.

| format        | what                                                        | loads with                            |
|---------------|-------------------------------------------------------------|---------------------------------------|
| `diffusers`   | the whole pipeline folder                                   | StableDiffusionPipeline.from_pretrained |
| `unet`        | the UNet component folder                                   | UNet2DConditionModel.from_pretrained  |
| `trained`     | only the trained tensors, diffusers keys (the 2025 code's)  | unet.load_state_dict(load_file(p), strict=False) |
| `single_file` | one CompVis checkpoint (UNet + VAE + text encoder)          | A1111, ComfyUI, from_single_file      |
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from convert.diffusers_format import save_component, save_pipeline
from convert.esd_weights import apply_esd_weights, write_trained_safetensors
from esd_jax.files import write_json
from convert.single_file import save_single_file
from esd_jax.pipeline import StableDiffusion

FORMATS = ('diffusers', 'unet', 'trained', 'single_file')
# Where each format lands inside the export folder.
OUTPUTS = {'diffusers': 'pipeline', 'unet': 'unet', 'trained': 'unet_trained.safetensors',
           'single_file': 'model.safetensors'}


def erased_pipeline(pipe: StableDiffusion, trained: Mapping[str, Any], *, source: str = 'trained tensors'):
  """A copy of `pipe` whose UNet has `trained` laid over it; `pipe` itself is unchanged."""
  return dataclasses.replace(pipe, unet=apply_esd_weights(nnx.clone(pipe.unet), trained, source=source))


def write_erased(pipe: StableDiffusion, trained: Mapping[str, Any], folder: str | os.PathLike,
           formats: Sequence[str] = FORMATS, *, dtype: str | None = None,
           metadata: Mapping[str, Any] | None = None) -> dict[str, Path]:
  """Writes the erased model in each of `formats` under `folder`; returns format → path."""
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ValueError(f'Unknown export format(s) {unknown or list(formats)}; choose from {list(FORMATS)}.')
  folder = Path(folder)
  erased = erased_pipeline(pipe, trained)
  paths = {f: folder / OUTPUTS[f] for f in formats}
  for fmt, path in paths.items():
    if fmt == 'diffusers':
      save_pipeline(erased, path, dtype=dtype)
    elif fmt == 'unet':
      save_component(erased.unet, path, dtype=dtype)
    elif fmt == 'trained':
      write_trained_safetensors(path, trained, dtype=dtype,
                                metadata={'esd_jax.run': json.dumps(dict(metadata or {}), sort_keys=True)})
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
    paths = write_erased(pipe, trained, folder / name, formats, dtype=dtype, metadata={**(metadata or {}), **description})
    files = sorted(p for path in paths.values() for p in ([path] if path.is_file() else path.rglob('*'))
                   if p.is_file())
    entries.append({**description, 'name': name, 'status': 'done',
                    'formats': {fmt: str(path.relative_to(folder)) for fmt, path in paths.items()},
                    'sha256': {str(p.relative_to(folder)): _sha256(p) for p in files}})
  manifest = {'run': dict(metadata or {}), 'models': entries + [{**f, 'status': 'failed'} for f in failed]}
  write_json(folder / 'manifest.json', manifest)
  return manifest
