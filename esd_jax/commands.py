"""The jobs behind `main.py`'s commands: each takes the experiment's ConfigDict."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from esd_jax import images
from esd_jax.generate import text_to_image

_COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def load_model(config: ml_collections.ConfigDict, *, sharding=None):
  """The pipeline that `config.model` names (see configs/default.py), each tensor placed by `sharding`."""
  from convert import load_pipeline
  from esd_jax.tiny import random_pipeline

  path = config.model
  if path == 'tiny-random':
    path = Path(config.workdir) / 'tiny-random'
    if not (path / 'model_index.json').is_file():
      logging.info('Building the small random pipeline in %s', path)
      random_pipeline(path)
  return load_pipeline(path, variant=config.variant or None, tokenizer=config.tokenizer or None,
                       prediction_type=config.prediction_type or None, sharding=sharding)


def compute_dtype(name: str):
  if name not in _COMPUTE_DTYPES:
    raise ValueError(f'Unknown compute dtype {name!r}; choose one of {sorted(_COMPUTE_DTYPES)}.')
  return _COMPUTE_DTYPES[name]


def generate(config: ml_collections.ConfigDict) -> Path:
  """Writes one PNG per prompt and seed, and a grid (rows: prompts, columns: seeds), to workdir/generate."""
  g = config.generate
  out = Path(config.workdir) / 'generate'
  pipe = load_model(config)
  kwargs = dict(negative_prompt=g.negative_prompt, guidance_scale=g.guidance_scale, num_inference_steps=g.steps,
                height=g.height or None, width=g.width or None, eta=g.eta, dtype=compute_dtype(g.dtype),
                scheduler=None if g.scheduler == 'config' else g.scheduler)
  rows = []
  start = time.perf_counter()
  for seed in tqdm(g.seeds, desc='generate', unit='seed'):
    batch, _ = text_to_image(pipe, list(g.prompts), seed=seed, **kwargs)
    rows.append(np.asarray(batch))
    for prompt, image in zip(g.prompts, rows[-1]):
      images.save_png(image, out / f'{_slug(prompt)}_seed{seed}.png')
  grid = [[rows[j][i] for j in range(len(g.seeds))] for i in range(len(g.prompts))]
  path = images.save_grid(out / 'grid.png', grid, row_labels=list(g.prompts),
                          col_labels=[f'seed {s}' for s in g.seeds], scale=max(1, 128 // grid[0][0].shape[0]))
  logging.info('Wrote %d images and %s in %.1f s', len(g.prompts) * len(g.seeds), path, time.perf_counter() - start)
  print(f'Images in {out}; grid: {path}')
  return path


def _slug(text: str) -> str:
  return ''.join(c if c.isalnum() else '_' for c in text.lower()).strip('_')[:60] or 'empty'


def erase(config: ml_collections.ConfigDict):
  """Trains (or resumes) the erasure and saves the trained tensors to workdir/erased."""
  from convert.esd_weights import write_trained_safetensors
  from esd_jax.train import erase as run

  result = run(config)
  path = Path(config.workdir) / 'erased' / 'unet_trained.safetensors'
  write_trained_safetensors(path, result.trained, metadata={'esd_jax.run': json.dumps(result.metadata)})
  print(f'Erased weights ({len(result.trained)} tensors) in {path}')
  return result


REFERENCE_CONFIGS = Path(__file__).parent / 'models' / 'reference_configs'


def unet_config(model: str) -> dict:
  """A UNet config.json without loading weights: a reference name (sd-v1-4, sd-v2-1, sdxl-base-1.0) or a
  diffusers pipeline folder."""
  from convert.diffusers_format import read_json

  known = sorted(p.name for p in REFERENCE_CONFIGS.iterdir())
  if model in known:
    return read_json(REFERENCE_CONFIGS / model / 'unet' / 'config.json')
  if Path(model).is_dir():
    return read_json(Path(model) / 'unet' / 'config.json')
  raise ValueError(f'dry_run reads the UNet config of a diffusers folder or of a reference model {known}; '
                   f'{model!r} is neither.')


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Prints what the erasure would train: tensors, parameters and Adam state bytes, from the config alone."""
  from esd_jax.methods import summary
  from esd_jax.models import build_abstract
  from esd_jax.models.state_dict import param_shapes

  from esd_jax.tiny import UNET

  shapes = param_shapes(build_abstract(UNET if config.model == 'tiny-random' else unet_config(config.model)))
  info = summary(shapes, config.erase.method, config.erase.patterns)
  print(f'model            {config.model}')
  print(f'method           {config.erase.method}')
  print(f'trained tensors  {info["tensors"]:,} of {info["total_tensors"]:,}')
  print(f'trained params   {info["parameters"]:,} of {info["total_parameters"]:,} '
        f'({100 * info["parameters"] / info["total_parameters"]:.2f} %)')
  print(f'Adam state       {info["optimizer_state_bytes"] / 2**20:,.1f} MiB (fp32 mu and nu)')
  return info
