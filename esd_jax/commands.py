"""The jobs behind `main.py`'s commands: each takes the experiment's ConfigDict."""

from __future__ import annotations

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


def _sampling(g: ml_collections.ConfigDict) -> dict:
  """text_to_image settings from the config's generate section."""
  return dict(negative_prompt=g.negative_prompt, guidance_scale=g.guidance_scale, num_inference_steps=g.steps,
              height=g.height or None, width=g.width or None, eta=g.eta, dtype=compute_dtype(g.dtype),
              scheduler=None if g.scheduler == 'config' else g.scheduler)


def generate(config: ml_collections.ConfigDict) -> Path:
  """Writes one PNG per prompt and seed, and a grid (rows: prompts, columns: seeds), to workdir/generate."""
  g = config.generate
  out = Path(config.workdir) / 'generate'
  pipe = load_model(config)
  kwargs = _sampling(g)
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
  """Trains (or resumes) the erasure, then writes the erased model to workdir/erased in export.formats."""
  from convert.export import export
  from esd_jax.train import erase as run

  result = run(config)
  paths = export(result.pipe, result.trained, Path(config.workdir) / 'erased', config.export.formats,
                 dtype=config.export.dtype, metadata=result.metadata)
  for fmt, path in paths.items():
    print(f'Erased model ({fmt}): {path}')
  return result


def _weights(config: ml_collections.ConfigDict):
  """The ESD weights that `export` and `compare` use: export.weights, or this workdir's erasure."""
  from convert.esd_weights import read_esd_weights

  path = config.export.weights or Path(config.workdir) / 'erased' / 'unet_trained.safetensors'
  if not Path(path).is_file():
    raise FileNotFoundError(f'{path}: no ESD weights. Run `erase` with this workdir first, or point '
                            '--config.export.weights at a weights file (ours or the authors\' .pt/.safetensors).')
  return read_esd_weights(path)


def export(config: ml_collections.ConfigDict) -> dict:
  """Writes the base model with ESD weights applied to workdir/export, in every format of export.formats."""
  from convert.export import export as write

  weights = _weights(config)
  paths = write(load_model(config), weights, Path(config.workdir) / 'export', config.export.formats,
                dtype=config.export.dtype, metadata={'weights': weights.source, **weights.metadata})
  for fmt, path in paths.items():
    print(f'{fmt}: {path}')
  return paths


def compare(config: ml_collections.ConfigDict) -> Path:
  """Original vs erased, side by side, for generate.prompts × generate.seeds: workdir/compare/grid.png."""
  from convert.export import erased_pipeline

  g = config.generate
  pipe = load_model(config)
  weights = _weights(config)
  models = {'original': pipe, 'erased': erased_pipeline(pipe, weights)}
  columns, labels = [], []
  for seed in tqdm(g.seeds, desc='compare', unit='seed'):
    for name, model in models.items():
      batch, _ = text_to_image(model, list(g.prompts), seed=seed, **_sampling(g))
      columns.append(np.asarray(batch))
      labels.append(f'{name} {seed}')
  rows = [[column[i] for column in columns] for i in range(len(g.prompts))]
  path = images.save_grid(Path(config.workdir) / 'compare' / 'grid.png', rows, row_labels=list(g.prompts),
                          col_labels=labels, scale=max(1, 128 // rows[0][0].shape[0]))
  print(f'Original vs erased ({weights.source}): {path}')
  return path


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
