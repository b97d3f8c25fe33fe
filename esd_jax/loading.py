"""Where `config.model` comes from: the one place that turns a model name into a pipeline or a UNet config.

A model is
- `shapes-world`: the small trained pipeline shipped in esd_jax/shapes_world/assets (README);
- `tiny-random`: a small random SD 1.x-structured pipeline, built on first use under the workdir;
- a reference name (`sd-v1-4`, `sd-v2-1`, `sdxl-base-1.0`): the UNet config alone, for `dry_run` (no weights);
- a diffusers pipeline folder;
- a CompVis single file (*.safetensors, or *.ckpt / *.pt / *.pth with torch);
- a Hub repo id ("org/name"), fetched with huggingface_hub (only the safetensors files esd-jax reads).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections

from esd_jax import shapes_world
from esd_jax.files import read_json
from esd_jax.models import attention
from esd_jax.pipeline import StableDiffusion

REFERENCE_CONFIGS = Path(__file__).parent / 'models' / 'reference_configs'
SINGLE_FILE_SUFFIXES = ('.safetensors', '.ckpt', '.pt', '.pth')
BUILT_IN = ('shapes-world', 'tiny-random')


class ModelNotFound(FileNotFoundError):
  """`config.model` names nothing esd-jax can read; the message says what it accepts."""


def reference_names() -> list[str]:
  return sorted(p.name for p in REFERENCE_CONFIGS.iterdir())


def _is_hub_id(model: str) -> bool:
  return model.count('/') == 1 and not os.path.isabs(model) and not Path(model).exists()


def model_path(model: str, workdir: str | os.PathLike) -> str | Path:
  """The folder, file or Hub repo id that `model` names (tiny-random is built under `workdir` on first use)."""
  if model == 'shapes-world':
    return shapes_world.PIPELINE
  if model == 'tiny-random':
    path = Path(workdir) / 'tiny-random'
    if not (path / 'model_index.json').is_file():
      from esd_jax.tiny import random_pipeline
      random_pipeline(path)
    return path
  if model in reference_names():
    raise ModelNotFound(f'{model!r} is a reference config without weights: only `dry_run` reads it. For the '
                        'other commands point --config.model at a diffusers folder, a single file or a Hub id.')
  if _is_hub_id(model):
    return model
  path = Path(model)
  if path.is_file():
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
      raise ModelNotFound(f'{path} is a file but not a single-file checkpoint: esd-jax reads single files named '
                          f'{"/".join(SINGLE_FILE_SUFFIXES)}, or a diffusers pipeline folder.')
    return path
  if path.is_dir():
    if not (path / 'model_index.json').is_file():
      raise ModelNotFound(f'{path}: a folder without model_index.json, so not a diffusers pipeline folder. Point '
                          '--config.model at the pipeline folder itself (the one holding model_index.json).')
    return path
  raise ModelNotFound(f'{model}: no such pipeline folder or checkpoint file. --config.model takes a diffusers '
                      f'folder, a single file ({"/".join(SINGLE_FILE_SUFFIXES)}), a Hub repo id "org/name", or '
                      f'one of {list(BUILT_IN)}.')


def _download(repo: str, variant: str | None, patterns: list[str] | None = None) -> Path:
  """A Hub repo's files that esd-jax reads (needs network access to the Hub)."""
  from huggingface_hub import snapshot_download
  weights = f'*.{variant}.safetensors' if variant else '*.safetensors'
  return Path(snapshot_download(repo, allow_patterns=patterns or [
      'model_index.json', '*/config.json', '*/scheduler_config.json', 'tokenizer*/*', f'*/{weights}',
      '*/*.safetensors.index*.json']))


def load_pipeline(path: str | os.PathLike, *, variant: str | None = None, tokenizer=None,
                  prediction_type: str | None = None, sharding=None) -> StableDiffusion:
  """A pipeline from a diffusers folder, a Hub repo id or a CompVis single file, each tensor placed by
  `sharding` (key, shape → jax.sharding.Sharding)."""
  from convert import diffusers_format, single_file

  if Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES:
    return single_file.load_single_file(path, tokenizer=tokenizer, prediction_type=prediction_type,
                                        sharding=sharding)
  folder = _download(str(path), variant) if _is_hub_id(str(path)) else Path(path)
  return diffusers_format.load_folder(folder, variant=variant, sharding=sharding)


def load_model(config: ml_collections.ConfigDict, *, sharding=None) -> StableDiffusion:
  """The pipeline that `config.model` names (configs/default.py documents the fields), its attention layers set to
  `config.attention`."""
  attention.check(config.attention)
  pipe = load_pipeline(model_path(config.model, config.workdir), variant=config.variant or None,
                       tokenizer=config.tokenizer or None, prediction_type=config.prediction_type or None,
                       sharding=sharding)
  for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
    if module is not None:
      attention.use(module, config.attention)
  return pipe


def component_config(model: str, workdir: str | os.PathLike = '.', component: str = 'unet', *,
                     prediction_type: str | None = None) -> dict[str, Any]:
  """The config.json of one component ('unet', 'vae', 'text_encoder') of `model` (any name model_path takes, and
  the reference names), without reading weights (single files: from their stored configs or tensor shapes)."""
  if model == 'tiny-random':
    from esd_jax import tiny
    return dict({'unet': tiny.UNET, 'vae': tiny.VAE, 'text_encoder': tiny.TEXT_ENCODER}[component])
  if model in reference_names():
    return read_json(REFERENCE_CONFIGS / model / component / 'config.json')
  path = model_path(model, workdir)
  if isinstance(path, str):
    return read_json(_download(path, None, [f'{component}/config.json']) / component / 'config.json')
  if path.is_file():
    from convert import compvis
    components, _, metadata = compvis.read_single_file(path)
    stored = compvis.stored_configs(metadata, source=str(path))
    return (stored or compvis.infer_configs(components, prediction_type=prediction_type))[component]
  return read_json(path / component / 'config.json')


def unet_config(model: str, workdir: str | os.PathLike = '.', *, prediction_type: str | None = None
                ) -> dict[str, Any]:
  return component_config(model, workdir, 'unet', prediction_type=prediction_type)
