"""Measures a shapes-world pipeline: what its generations show, as the shipped classifier sees them.

For each prompt, n images from seeds 0…n-1 (image j of every prompt starts from the same noise, so rows of
different prompts or models compare seed by seed); the classifier names each image's shape and colour, and
the accuracy is the fraction showing what the prompt names (None where the prompt names no shape/colour).
Runs on our JAX pipeline, or on diffusers' StableDiffusionPipeline in PyTorch for the same folder.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from esd_jax import distributed, images, shapes_world
from esd_jax.files import write_json
from esd_jax.shapes_world import classifier as judge
from esd_jax.shapes_world import world
from esd_jax.generate import latent_size, text_to_image
from esd_jax.pipeline import StableDiffusion



@dataclasses.dataclass(frozen=True)
class Sampling:
  steps: int = 50
  guidance_scale: float = 7.5
  batch_size: int = 256  # images per compiled sampling call


def initial_latents(shape: tuple[int, int, int], seeds: Sequence[int]) -> np.ndarray:
  """(len(seeds), h, w, c) standard normal noise, one draw per seed, the same for every prompt and model."""
  return np.stack([np.asarray(jax.random.normal(jax.random.key(s), shape, jnp.float32)) for s in seeds])


def generate_jax(pipe: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling,
                 *, desc: str = 'sample') -> np.ndarray:
  """float images (len(prompts), len(seeds), 64, 64, 3) in [0, 1] from our JAX pipeline (DDIM, η = 0)."""
  h, w = latent_size(pipe, None, None)
  noise = initial_latents((h, w, pipe.unet.config['in_channels']), seeds)
  jobs = [(p, j) for p in prompts for j in range(len(seeds))]
  out = []
  for i in tqdm(range(0, len(jobs), sampling.batch_size), desc=desc, unit='batch', leave=False,
                disable=not distributed.is_main()):
    chunk = jobs[i:i + sampling.batch_size]
    pad = sampling.batch_size - len(chunk) if len(jobs) > sampling.batch_size else 0
    chunk = chunk + chunk[:1] * pad  # one compiled shape for every batch
    batch, _ = text_to_image(pipe, [p for p, _ in chunk], latents=noise[[j for _, j in chunk]],
                             guidance_scale=sampling.guidance_scale, num_inference_steps=sampling.steps)
    out.append(np.asarray(batch)[:len(chunk) - pad])
  return np.concatenate(out).reshape(len(prompts), len(seeds), *out[0].shape[1:])


def generate_diffusers(folder: str | os.PathLike, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling,
                       *, latent_shape: tuple[int, int, int], desc: str = 'diffusers') -> np.ndarray:
  """The same images from diffusers' StableDiffusionPipeline on `folder` (PyTorch, CPU, DDIM), from the same
  initial noise. Needs torch."""
  import torch
  from diffusers import DDIMScheduler, StableDiffusionPipeline

  pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  noise = initial_latents(latent_shape, seeds)
  out = []
  for prompt in tqdm(prompts, desc=desc, unit='prompt', leave=False):
    latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
      images = pipe([prompt] * len(seeds), latents=latents, num_inference_steps=sampling.steps,
                    guidance_scale=sampling.guidance_scale, output_type='np').images
    out.append(images)
  return np.stack(out)


def score(model: judge.ShapesClassifier, prompts: Sequence[str], images: np.ndarray) -> dict[str, dict]:
  """Per prompt: the fraction of its images showing the prompted shape and colour, and the counts of
  each predicted shape and colour."""
  n_prompts, n_seeds = images.shape[:2]
  shape_ids, colour_ids, _, _ = judge.predict(model, images.reshape(-1, *images.shape[2:]))
  shape_ids, colour_ids = shape_ids.reshape(n_prompts, n_seeds), colour_ids.reshape(n_prompts, n_seeds)
  report = {}
  for i, prompt in enumerate(prompts):
    shape, colour = world.parse(prompt)
    report[prompt] = {
        'shape': None if shape is None else float(np.mean(shape_ids[i] == shape)),
        'colour': None if colour is None else float(np.mean(colour_ids[i] == colour)),
        'shapes': {name: int(np.sum(shape_ids[i] == k)) for k, name in enumerate(world.SHAPES)},
        'colours': {name: int(np.sum(colour_ids[i] == k)) for k, name in enumerate(world.COLOUR_NAMES)},
    }
  return report


def load_judge(name: str | os.PathLike = 'shapes-world') -> judge.ShapesClassifier:
  """The classifier `evaluate.classifier` names: 'shapes-world' (the shipped one) or a classifier folder."""
  folder = shapes_world.CLASSIFIER if str(name) == 'shapes-world' else Path(name)
  if not (folder / 'config.json').is_file():
    raise FileNotFoundError(f'{folder}: no shapes classifier here. The shipped one is {shapes_world.CLASSIFIER}; '
                            'train one with `python main.py train_world`.')
  return judge.load_classifier(folder)


def mean_rate(report: dict[str, dict], key: str, prompts: Sequence[str]) -> float:
  values = [report[p][key] for p in prompts if report[p][key] is not None]
  return float(np.mean(values)) if values else float('nan')


def erasure_summary(base: dict[str, dict], erased: dict[str, dict], concept: str) -> dict:
  """The erasure's effect on what the concept names (a shape or a colour of the world) and on the rest.

  `erased_rate`: over prompts naming the concept, the fraction of erased-model images still showing it.
  `others`: for each other shape (colour), its accuracy over the prompts naming it, before and after.
  For a colour, `kept_shape` is the shape accuracy on the prompts naming the erased colour.
  """
  shape, colour = world.parse(concept)
  if (shape is None) == (colour is None):
    raise ValueError(f'{concept!r} names {"no" if shape is None else "more than one"} shape or colour of the '
                     f'world; the summary measures erasing one of {world.SHAPES + world.COLOUR_NAMES}.')
  key, names, erased_id = ('shape', world.SHAPES, shape) if shape is not None else ('colour', world.COLOUR_NAMES,
                                                                                    colour)
  naming = lambda k: [p for p in base if world.parse(p)[0 if key == 'shape' else 1] == k]
  summary = {'concept': concept, 'kind': key, 'base_rate': mean_rate(base, key, naming(erased_id)),
             'erased_rate': mean_rate(erased, key, naming(erased_id)), 'others': {}}
  for k, name in enumerate(names):
    if k != erased_id:
      before, after = mean_rate(base, key, naming(k)), mean_rate(erased, key, naming(k))
      summary['others'][name] = {'before': before, 'after': after, 'drop': before - after}
  summary['max_other_drop'] = max(o['drop'] for o in summary['others'].values())
  if key == 'colour':
    summary['kept_shape'] = mean_rate(erased, 'shape', naming(erased_id))
  return summary


def comparison_grid(path: Path, prompts: Sequence[str], columns: dict[str, np.ndarray], n: int) -> Path:
  """Rows: prompts; columns: the first n seeds of each model, model after model."""
  rows = [[image for batch in columns.values() for image in batch[i, :n]] for i in range(len(prompts))]
  labels = [f'{name} {j}' for name, batch in columns.items() for j in range(batch[:, :n].shape[1])]
  return images.save_grid(path, rows, row_labels=list(prompts), col_labels=labels,
                          scale=max(1, 128 // rows[0][0].shape[0]))


def measure_erasure(workdir: Path, judge_model: judge.ShapesClassifier, prompts: Sequence[str],
                    seeds: Sequence[int], sampling: Sampling, original: StableDiffusion,
                    erased: dict[str, tuple[StableDiffusion, list[str]]], *, grid_seeds: int,
                    run: dict) -> dict:
  """Generates prompts × seeds with the original and each erased model ({name: (pipeline, concepts it
  erased)}), has the classifier name what each image shows, and writes workdir/report.json (`run` describes
  the erasure) and workdir/erasure.png (rows: prompts; columns: the first grid_seeds seeds of each model)."""
  start = time.perf_counter()
  models = {'original': original, **{name: model for name, (model, _) in erased.items()}}
  generated = {name: generate_jax(model, prompts, seeds, sampling, desc=name) for name, model in models.items()}
  reports = {name: score(judge_model, prompts, batch) for name, batch in generated.items()}
  in_world = lambda c: (world.parse(c)[0] is None) != (world.parse(c)[1] is None)  # one shape or one colour
  summaries = {name: [erasure_summary(reports['original'], reports[name], c) for c in concepts if in_world(c)]
               for name, (_, concepts) in erased.items()}
  report = {
      **run, 'images_per_prompt': len(seeds),
      'sampling': {'scheduler': 'ddim', 'steps': sampling.steps, 'guidance_scale': sampling.guidance_scale},
      'seconds': {'erase': run.get('seconds'), 'measure': round(time.perf_counter() - start, 1)},
      'models': {name: {'concepts': concepts, 'summary': summaries[name],
                        'per_prompt': {p: reports[name][p] for p in prompts}}
                 for name, (_, concepts) in erased.items()},
      'original': {'per_prompt': reports['original']},
  }
  if not distributed.is_main():  # the other processes of a multi-process run computed the same
    return report
  write_json(workdir / 'report.json', report)
  grid = comparison_grid(workdir / 'erasure.png', prompts, generated, grid_seeds)
  for name, model_summaries in summaries.items():
    for s in model_summaries:
      others = ', '.join(f'{k} {v["before"]:.0%}→{v["after"]:.0%}' for k, v in s['others'].items())
      kept = f'; their shape kept in {s["kept_shape"]:.0%}' if 'kept_shape' in s else ''
      print(f'[{name}] {s["concept"]}: shown in {s["base_rate"]:.0%} → {s["erased_rate"]:.0%} of the images of '
            f'prompts naming it{kept}; other {s["kind"]}s: {others}')
  print(f'Report: {workdir / "report.json"}; grid: {grid}')
  return report
