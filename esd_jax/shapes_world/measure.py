"""Measures a shapes-world pipeline: what its generations show, as the shipped classifier sees them.

For each prompt, n images from seeds 0…n-1 (image j of every prompt starts from the same noise, so rows of
different prompts or models compare seed by seed); the classifier names each image's shape and colour, and
the accuracy is the fraction showing what the prompt names (None where the prompt names no shape/colour).
Runs on our JAX pipeline, or on diffusers' StableDiffusionPipeline in PyTorch for the same folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from esd_jax import classifier as judge
from esd_jax.shapes_world import world
from esd_jax.generate import latent_size, text_to_image
from esd_jax.pipeline import StableDiffusion

ASSETS = Path(__file__).parent / 'assets'
SHAPES_WORLD = ASSETS / 'shapes_world'  # the shipped text-to-image pipeline (diffusers folder)
SHAPES_CLASSIFIER = ASSETS / 'shapes_classifier'  # its judge (classifier.save_classifier folder)


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
  for i in tqdm(range(0, len(jobs), sampling.batch_size), desc=desc, unit='batch', leave=False):
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


def load_judge(folder: str | os.PathLike = SHAPES_CLASSIFIER) -> judge.ShapesClassifier:
  if not (Path(folder) / 'config.json').is_file():
    raise FileNotFoundError(f'{folder}: no shapes classifier here. The shipped one is {SHAPES_CLASSIFIER}; '
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
