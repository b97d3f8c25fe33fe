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
from esd_jax.shapes_world.measure import SHAPES_CLASSIFIER, SHAPES_WORLD
from esd_jax.generate import text_to_image

_COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_path(config: ml_collections.ConfigDict) -> str | Path:
  """Where `config.model` lives: the built-in names resolved to their folders (tiny-random built on first use)."""
  from esd_jax.tiny import random_pipeline

  if config.model == 'shapes-world':
    return SHAPES_WORLD
  if config.model == 'tiny-random':
    path = Path(config.workdir) / 'tiny-random'
    if not (path / 'model_index.json').is_file():
      logging.info('Building the small random pipeline in %s', path)
      random_pipeline(path)
    return path
  return config.model


def load_model(config: ml_collections.ConfigDict, *, sharding=None):
  """The pipeline that `config.model` names (see configs/default.py), each tensor placed by `sharding`."""
  from convert import load_pipeline

  return load_pipeline(model_path(config), variant=config.variant or None, tokenizer=config.tokenizer or None,
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
  """Trains (or resumes) the erasure, writes the erased model(s) to workdir/erased in export.formats, and
  (evaluate.classifier set) measures them against the original."""
  from convert.erased import erased_pipeline, export, export_models
  from esd_jax.train import erase as run

  result = run(config)
  out = Path(config.workdir) / 'erased'
  kwargs = dict(dtype=config.export.dtype, metadata=result.metadata)
  if config.erase.separate_models:
    def describe(m):
      concepts = result.model_concepts(m)
      return {'prompt': concepts[0].prompt, 'erase_from': [c.erase_from for c in concepts],
              'negative_guidance': [c.negative_guidance for c in concepts],
              'learning_rate': result.learning_rates[m], 'iterations': result.iterations[m]}
    name = lambda m: f'{m:03d}-{_slug(result.model_concepts(m)[0].prompt)}'
    models = [(name(m), describe(m), trained) for m, _, trained in result.models()]
    failed = [{**describe(m), 'name': name(m), 'why': why} for m, why in sorted(result.failed.items())]
    export_models(result.pipe, models, out, config.export.formats, failed=failed, **kwargs)
    print(f'{len(models)} erased models in {out} (manifest.json); {len(failed)} stopped')
    erased = {name: (erased_pipeline(result.pipe, trained), [c['prompt']]) for name, c, trained in models}
  else:
    for fmt, path in export(result.pipe, result.trained, out, config.export.formats, **kwargs).items():
      print(f'Erased model ({fmt}): {path}')
    concepts = list(dict.fromkeys(c.prompt for c in result.concepts))  # "red" erased from several prompts: once
    erased = {'erased': (erased_pipeline(result.pipe, result.trained), concepts)}
  if config.evaluate.classifier:
    measure_erasure(config, result.pipe, erased, result.metadata)
  return result


def _judge(config: ml_collections.ConfigDict):
  from esd_jax.shapes_world.measure import load_judge
  e = config.evaluate
  return load_judge(SHAPES_CLASSIFIER if e.classifier == 'shapes-world' else e.classifier)


def _evaluation(config: ml_collections.ConfigDict):
  from esd_jax.shapes_world.measure import Sampling
  e = config.evaluate
  if e.seeds < 1 or not e.prompts:
    raise ValueError(f'evaluate.seeds = {e.seeds} and evaluate.prompts = {e.prompts!r}: measure at least one '
                     'prompt with at least one seed.')
  return list(e.prompts), list(range(e.seeds)), Sampling(e.steps, e.guidance_scale, e.batch_size)


def _comparison_grid(path: Path, prompts, columns: dict[str, np.ndarray], n: int) -> Path:
  """Rows: prompts; columns: the first n seeds of each model, model after model."""
  rows = [[image for batch in columns.values() for image in batch[i, :n]] for i in range(len(prompts))]
  labels = [f'{name} {j}' for name, batch in columns.items() for j in range(batch[:, :n].shape[1])]
  return images.save_grid(path, rows, row_labels=list(prompts), col_labels=labels,
                          scale=max(1, 128 // rows[0][0].shape[0]))


def measure_erasure(config: ml_collections.ConfigDict, pipe, erased: dict[str, tuple], metadata: dict) -> dict:
  """Generates evaluate.prompts × evaluate.seeds with the original and each erased model ({name: (pipeline,
  concepts it erased)}), has the classifier name what each image shows, and writes workdir/report.json and
  workdir/erasure.png (rows: prompts; columns: the first evaluate.grid_seeds seeds of each model)."""
  from esd_jax.files import write_json
  from esd_jax.shapes_world.measure import erasure_summary, generate_jax, score
  from esd_jax.shapes_world.world import parse

  judge = _judge(config)
  prompts, seeds, sampling = _evaluation(config)
  start = time.perf_counter()
  models = {'original': pipe, **{name: model for name, (model, _) in erased.items()}}
  generated = {name: generate_jax(model, prompts, seeds, sampling, desc=name) for name, model in models.items()}
  reports = {name: score(judge, prompts, batch) for name, batch in generated.items()}
  in_world = lambda c: (parse(c)[0] is None) != (parse(c)[1] is None)  # names one shape or one colour
  summaries = {name: [erasure_summary(reports['original'], reports[name], c) for c in concepts if in_world(c)]
               for name, (_, concepts) in erased.items()}
  report = {
      'model': str(config.model), 'method': config.erase.method, 'convention': config.erase.convention,
      'negative_guidance': config.erase.negative_guidance, 'iterations': config.train.iterations,
      'learning_rate': config.train.learning_rate, 'images_per_prompt': len(seeds),
      'sampling': {'scheduler': 'ddim', 'steps': sampling.steps, 'guidance_scale': sampling.guidance_scale},
      'seconds': {'erase': metadata.get('seconds'), 'measure': round(time.perf_counter() - start, 1)},
      'models': {name: {'concepts': concepts, 'summary': summaries[name],
                        'per_prompt': {p: reports[name][p] for p in prompts}}
                 for name, (_, concepts) in erased.items()},
      'original': {'per_prompt': reports['original']},
  }
  workdir = Path(config.workdir)
  write_json(workdir / 'report.json', report)
  grid = _comparison_grid(workdir / 'erasure.png', prompts, generated, config.evaluate.grid_seeds)
  for name, model_summaries in summaries.items():
    for s in model_summaries:
      others = ', '.join(f'{k} {v["before"]:.0%}→{v["after"]:.0%}' for k, v in s['others'].items())
      kept = f'; their shape kept in {s["kept_shape"]:.0%}' if 'kept_shape' in s else ''
      print(f'[{name}] {s["concept"]}: shown in {s["base_rate"]:.0%} → {s["erased_rate"]:.0%} of the images of '
            f'prompts naming it{kept}; other {s["kind"]}s: {others}')
  print(f'Report: {workdir / "report.json"}; grid: {grid}')
  return report


def evaluate(config: ml_collections.ConfigDict) -> dict:
  """Measures config.model (with export.weights applied, when set) on evaluate.prompts × evaluate.seeds, on
  our JAX pipeline or (evaluate.backend=diffusers) on diffusers' StableDiffusionPipeline in PyTorch; writes
  workdir/evaluate_{backend}.json and a grid of the first evaluate.grid_seeds seeds."""
  from esd_jax.files import write_json
  from esd_jax.shapes_world.measure import generate_diffusers, generate_jax, score
  from esd_jax.generate import latent_size

  e = config.evaluate
  prompts, seeds, sampling = _evaluation(config)
  judge = _judge(config)
  pipe = load_model(config)
  if config.export.weights:
    from convert.erased import erased_pipeline
    pipe = erased_pipeline(pipe, _weights(config))
  start = time.perf_counter()
  if e.backend == 'jax':
    generated = generate_jax(pipe, prompts, seeds, sampling)
  elif e.backend == 'diffusers':
    folder = Path(model_path(config))
    if config.export.weights or not (folder / 'model_index.json').is_file():
      raise ValueError('evaluate.backend=diffusers runs a diffusers pipeline folder as it is: point '
                       '--config.model at one (e.g. an erased model exported with export.formats=diffusers) '
                       'and leave export.weights empty.')
    generated = generate_diffusers(folder, prompts, seeds, sampling,
                                   latent_shape=(*latent_size(pipe, None, None), pipe.unet.config['in_channels']))
  else:
    raise ValueError(f'evaluate.backend = {e.backend!r}; choose jax or diffusers.')
  report = {'model': str(config.model), 'weights': config.export.weights, 'backend': e.backend,
            'images_per_prompt': len(seeds), 'seconds': round(time.perf_counter() - start, 1),
            'per_prompt': score(judge, prompts, generated)}
  workdir = Path(config.workdir)
  write_json(workdir / f'evaluate_{e.backend}.json', report)
  _comparison_grid(workdir / f'evaluate_{e.backend}.png', prompts, {e.backend: generated}, e.grid_seeds)
  for prompt, r in report['per_prompt'].items():
    shown = '  '.join(f'{k} {r[k]:.0%}' for k in ('shape', 'colour') if r[k] is not None)
    print(f'{prompt:24s} {shown}')
  print(f'Report: {workdir / f"evaluate_{e.backend}.json"}')
  return report


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
  from convert.erased import export as write

  weights = _weights(config)
  paths = write(load_model(config), weights, Path(config.workdir) / 'export', config.export.formats,
                dtype=config.export.dtype, metadata={'weights': weights.source, **weights.metadata})
  for fmt, path in paths.items():
    print(f'{fmt}: {path}')
  return paths


def compare(config: ml_collections.ConfigDict) -> Path:
  """Original vs erased, side by side, for generate.prompts × generate.seeds: workdir/compare/grid.png."""
  from convert.erased import erased_pipeline

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


def train_world(config: ml_collections.ConfigDict) -> Path:
  """Trains the shapes-world pipeline and its classifier (configs/train_world.py) into config.output."""
  from esd_jax.shapes_world.trainer import Recipe, train_world_model

  out = Path(config.output)
  train_judge(config.classifier.steps, config.classifier.seed, out / 'shapes_classifier')
  _, record = train_world_model(out / 'shapes_world', Recipe(**config.world.to_dict()))
  print(f'Shapes-world pipeline: {out / "shapes_world"} ({record["seconds"]})')
  return out


def train_judge(steps: int, seed: int, folder: Path) -> dict:
  """Trains the shapes classifier, saves it to `folder` with training.json (settings, held-out accuracy)."""
  from esd_jax.files import write_json
  from esd_jax import classifier

  start = time.perf_counter()
  judge = classifier.train_classifier(steps, seed)
  record = {'steps': steps, 'seed': seed, 'seconds': round(time.perf_counter() - start, 1),
            'held_out_accuracy': {'clean': classifier.held_out_accuracy(judge),
                                  'degraded': classifier.held_out_accuracy(judge, augmented=True)}}
  classifier.save_classifier(judge, folder)
  write_json(folder / 'training.json', record)
  print(f'Classifier: {folder}, held-out accuracy {record["held_out_accuracy"]}')
  return record
