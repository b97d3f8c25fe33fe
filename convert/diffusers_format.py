"""diffusers directories ⇄ esd-jax models, with no torch.

A component folder is `config.json` plus weights: `diffusion_pytorch_model[.variant].safetensors` (diffusers)
or `model[.variant].safetensors` (transformers), or shards listed in the matching `*.safetensors.index[.variant].json`.
A pipeline folder adds `model_index.json`, `scheduler/scheduler_config.json` and the tokenizers.
Models are built abstractly from their config and filled one tensor at a time, each put straight onto its
device or sharding; saving writes one tensor at a time to a temporary name, then renames.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

from esd_jax.files import SafetensorsReader, atomic_path, np_dtype, read_json, write_safetensors
from esd_jax.models import build_abstract, clip
from esd_jax.models.state_dict import load_state_dict, state_dict
from esd_jax.pipeline import StableDiffusion
from esd_jax.tokenizer import save_tokenizer

Sharding = Callable[[str, tuple[int, ...]], Any]

_WEIGHT_STEMS = ('diffusion_pytorch_model', 'model')
# transformers models are saved with transformers' config keys; diffusers models with diffusers'.
_TRANSFORMERS = {'CLIPTextModel': 'clip_text_model', 'CLIPTextModelWithProjection': 'clip_text_model'}
_DIFFUSERS_VERSION = '0.40.0'
_TRANSFORMERS_VERSION = '5.0.0'

# model_index.json entries, in the order diffusers writes them, for the pipelines we save.
_PIPELINES = {
    False: ('StableDiffusionPipeline', {'feature_extractor': [None, None], 'image_encoder': [None, None],
                                        'requires_safety_checker': False, 'safety_checker': [None, None]}),
    True: ('StableDiffusionXLPipeline', {'feature_extractor': [None, None], 'image_encoder': [None, None],
                                         'force_zeros_for_empty_prompt': True}),
}


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
  """The safetensors file(s) holding a component's weights, single or sharded."""
  for stem in _WEIGHT_STEMS:
    single = folder / (f'{stem}.{variant}.safetensors' if variant else f'{stem}.safetensors')
    index = folder / (f'{stem}.safetensors.index.{variant}.json' if variant else f'{stem}.safetensors.index.json')
    if single.is_file():
      return [single]
    if index.is_file():
      shards = sorted(set(read_json(index).get('weight_map', {}).values()))
      if not shards:
        raise ValueError(f'{index}: lists no shards in its "weight_map".')
      return [folder / s for s in shards]
  present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  hint = ''
  if any(p.endswith('.bin') for p in present):
    hint = ' It holds only pickled PyTorch .bin weights: re-save them as safetensors with diffusers.'
  elif variant is None and any('.safetensors' in p for p in present):
    hint = ' There are variant files: pass the variant (e.g. "fp16").'
  raise FileNotFoundError(f'{folder}: no {"variant " + repr(variant) + " " if variant else ""}safetensors '
                          f'weights found (expected {_WEIGHT_STEMS[0]}.safetensors or model.safetensors, or a '
                          f'sharded index). Folder holds: {present}.{hint}')


def load_component(folder: str | os.PathLike, *, variant: str | None = None,
                   sharding: Sharding | None = None) -> nnx.Module:
  """Builds the model that `folder/config.json` describes and fills it from the folder's safetensors."""
  folder = Path(folder)
  config = read_json(folder / 'config.json')
  module = build_abstract(config, source=str(folder / 'config.json'))
  with SafetensorsReader(weight_files(folder, variant)) as tensors:
    if type(module).__name__ in _TRANSFORMERS:  # transformers' files spell CLIP keys more than one way
      tensors = clip.canonical_keys(tensors)
    load_state_dict(module, tensors, source=str(folder), sharding=sharding)
  return module


def component_config(module: nnx.Module) -> dict[str, Any]:
  """The config.json that diffusers/transformers write for this model."""
  name = type(module).__name__
  if name in _TRANSFORMERS:
    return {**module.config, 'architectures': [name], 'model_type': _TRANSFORMERS[name],
            'transformers_version': _TRANSFORMERS_VERSION}
  return {'_class_name': name, '_diffusers_version': _DIFFUSERS_VERSION, **module.config}


def _write_component(module: nnx.Module, folder: Path, dtype) -> None:
  """Writes config.json and weights into a folder that is itself being written atomically."""
  folder.mkdir(parents=True, exist_ok=True)
  stem = 'model' if type(module).__name__ in _TRANSFORMERS else 'diffusion_pytorch_model'
  (folder / 'config.json').write_text(json.dumps(component_config(module), indent=2, sort_keys=True) + '\n')
  write_safetensors(folder / f'{stem}.safetensors', state_dict(module), metadata={'format': 'pt'}, dtype=dtype)


def save_component(module: nnx.Module, folder: str | os.PathLike, *, dtype: str | None = None) -> None:
  """Saves one model as a diffusers/transformers component folder (atomically)."""
  with atomic_path(folder) as tmp:
    _write_component(module, tmp, np_dtype(dtype))


def load_folder(root: Path, *, variant: str | None = None, sharding: Sharding | None = None) -> StableDiffusion:
  """Loads an SD 1.x/2.x/XL diffusers pipeline folder into esd-jax models."""
  from transformers import CLIPTokenizer

  index = read_json(root / 'model_index.json')
  parts: dict[str, Any] = {}
  for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2'):
    if isinstance(index.get(name), list) and index[name][0] is not None:
      parts[name] = load_component(root / name, variant=variant, sharding=sharding)
  for name in ('tokenizer', 'tokenizer_2'):
    if isinstance(index.get(name), list) and index[name][0] is not None:
      if not (root / name).is_dir():
        raise FileNotFoundError(f'{root / name}: missing, but model_index.json lists it.')
      parts[name] = CLIPTokenizer.from_pretrained(str(root / name))
  missing = [n for n in ('unet', 'vae', 'text_encoder', 'tokenizer') if n not in parts]
  if missing:
    raise ValueError(f'{root}/model_index.json: the pipeline lacks {missing}; esd-jax needs a Stable Diffusion '
                     'pipeline with a UNet, a VAE, a text encoder and a tokenizer.')
  return StableDiffusion(scheduler_config=read_json(root / 'scheduler' / 'scheduler_config.json'), **parts)


def save_pipeline(pipe: StableDiffusion, folder: str | os.PathLike, *, dtype: str | None = None) -> None:
  """Saves a pipeline folder that diffusers' StableDiffusion(XL)Pipeline.from_pretrained loads, atomically."""
  dt = np_dtype(dtype)
  class_name, extra = _PIPELINES[pipe.is_sdxl]
  index: dict[str, Any] = {'_class_name': class_name, '_diffusers_version': _DIFFUSERS_VERSION, **extra}
  with atomic_path(folder) as tmp:
    for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2'):
      module = getattr(pipe, name)
      if module is not None:
        _write_component(module, tmp / name, dt)
        lib = 'transformers' if type(module).__name__ in _TRANSFORMERS else 'diffusers'
        index[name] = [lib, type(module).__name__]
    for name in ('tokenizer', 'tokenizer_2'):
      tokenizer = getattr(pipe, name)
      if tokenizer is not None:
        save_tokenizer(tokenizer, tmp / name)
        index[name] = ['transformers', 'CLIPTokenizer']
    scheduler = pipe.scheduler_config
    (tmp / 'scheduler').mkdir()
    (tmp / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(scheduler, indent=2) + '\n')
    index['scheduler'] = ['diffusers', scheduler.get('_class_name', 'DDIMScheduler')]
    (tmp / 'model_index.json').write_text(json.dumps(index, indent=2, sort_keys=True) + '\n')
