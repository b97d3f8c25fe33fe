"""Measures a shapes-world pipeline: what its generations show, as the shipped classifier sees them.

For each prompt, n images from seeds 0…n-1 (image j of every prompt starts from the same noise, so rows of
different prompts or models compare seed by seed); the classifier names each image's shape and colour, or
'none' (no recognisable shape, no clear colour), and the accuracy is the fraction showing what the prompt names
(None where the prompt names no shape/colour): an image judged 'none' is not one that kept it.
Runs on our JAX pipeline, or on diffusers' StableDiffusionPipeline in PyTorch for the same folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from esd_jax import distributed, images, shapes_world
from esd_jax.files import atomic_path, tensor_summary, write_json
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


def _fingerprint(pipe: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling) -> str:
  """Names what the original model's generations depend on: every weight (per tensor, its float64 sum and sum of
  squares), the tokenizer's vocabulary size, the noise schedule, the prompts, seeds and sampling."""
  digest = hashlib.sha256()
  for name in ('unet', 'text_encoder', 'vae'):
    for path, leaf in sorted(nnx.to_flat_state(nnx.state(getattr(pipe, name), nnx.Param)), key=lambda kv: str(kv[0])):
      digest.update(tensor_summary(f'{name}{path}', leaf.value))
  digest.update(json.dumps([len(pipe.tokenizer), pipe.scheduler_config, list(prompts), list(seeds),
                            dataclasses.astuple(sampling)[:2]], sort_keys=True, default=str).encode())
  return digest.hexdigest()[:20]


def original_images(pipe: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling,
                    cache: str | os.PathLike = '') -> np.ndarray:
  """generate_jax of the original model, kept in the folder `cache` ('' for none) under a name that fingerprints
  the weights, prompts, seeds and sampling: a sweep of erasures of one base model generates its images once."""
  path = Path(cache) / f'original-{_fingerprint(pipe, prompts, seeds, sampling)}.npy' if cache else None
  if path is not None and path.is_file():
    return np.load(path)
  generated = generate_jax(pipe, prompts, seeds, sampling, desc='original')
  if path is not None and distributed.is_main():
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
      with open(tmp, 'wb') as f:  # np.save on a path would append .npy to the temporary name
        np.save(f, generated)
  return generated


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
  each predicted shape and colour, 'none' included (judge.SHAPE_LABELS, judge.COLOUR_LABELS)."""
  n_prompts, n_seeds = images.shape[:2]
  shape_ids, colour_ids, _, _ = judge.predict(model, images.reshape(-1, *images.shape[2:]))
  shape_ids, colour_ids = shape_ids.reshape(n_prompts, n_seeds), colour_ids.reshape(n_prompts, n_seeds)
  report = {}
  for i, prompt in enumerate(prompts):
    shape, colour = world.parse(prompt)
    report[prompt] = {
        'shape': None if shape is None else float(np.mean(shape_ids[i] == shape)),
        'colour': None if colour is None else float(np.mean(colour_ids[i] == colour)),
        'shapes': {name: int(np.sum(shape_ids[i] == k)) for k, name in enumerate(judge.SHAPE_LABELS)},
        'colours': {name: int(np.sum(colour_ids[i] == k)) for k, name in enumerate(judge.COLOUR_LABELS)},
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


def overall(report: dict[str, dict]) -> dict[str, float]:
  """score's report over all its prompts: mean shape and colour accuracy, fractions of images judged 'none'."""
  n = sum(sum(r['shapes'].values()) for r in report.values())
  return {'shape': mean_rate(report, 'shape', list(report)), 'colour': mean_rate(report, 'colour', list(report)),
          'rejected_shape': sum(r['shapes']['none'] for r in report.values()) / n,
          'rejected_colour': sum(r['colours']['none'] for r in report.values()) / n}


def record_base_model_check(pipe: StableDiffusion, seeds: int = 64, sampling: Sampling = Sampling(),
                            folder: Path = shapes_world.CLASSIFIER) -> dict:
  """The check that matters most for a judge: the shipped base model (`pipe`, loaded from
  shapes_world.PIPELINE) draws the world faithfully, so its generations (world.PROMPTS × seeds 0…seeds-1) must
  not be rejected. Adds `base_model_generations` (overall's numbers and the lowest prompt) to the judge's
  `folder`/training.json and returns it."""
  prompts = list(world.PROMPTS)
  report = score(judge.load_classifier(folder), prompts, generate_jax(pipe, prompts, range(seeds), sampling))
  lowest = min(prompts, key=lambda p: min(report[p]['shape'], report[p]['colour']))
  check = {'images_per_prompt': seeds, 'steps': sampling.steps, 'guidance_scale': sampling.guidance_scale,
           **overall(report), 'lowest_prompt': {'prompt': lowest, **{k: report[lowest][k] for k in ('shape', 'colour')}}}
  record = json.loads((folder / 'training.json').read_text())
  write_json(folder / 'training.json', {**record, 'base_model_generations': check})
  return check


_KINDS = {'shape': (0, world.SHAPES), 'colour': (1, world.COLOUR_NAMES)}  # world.parse's index, the names


def erasure_summary(base: dict[str, dict], erased: dict[str, dict], concept: str) -> dict:
  """The erasure's effect on what the concept names (a shape or a colour of the world) and on the rest, from
  score's reports of the original (`base`) and the erased model. An image judged 'none' shows nothing.

  `base_rate`, `erased_rate`: over prompts naming the concept, the fraction of images showing it.
  `others`: for each other concept of its kind (shape or colour), its accuracy before and after over the
  prompts naming it; `other_kind`: the same for each concept of the other kind, over the prompts naming it and
  not the erased concept (erasing circle measures red on "a red square / triangle / cross").
  `worst_other_shape`, `worst_other_colour`: {name, drop} of the largest drop of each kind; `max_other_drop`:
  the larger of the two (drops are fractions: 0.05 is 5 points of accuracy).
  `kept_colour` (a shape erased) or `kept_shape` (a colour erased): the other kind's accuracy after the
  erasure on the prompts naming the concept.
  """
  shape, colour = world.parse(concept)
  if (shape is None) == (colour is None):
    raise ValueError(f'{concept!r} names {"no" if shape is None else "more than one"} shape or colour of the '
                     f'world; the summary measures erasing one of {world.SHAPES + world.COLOUR_NAMES}.')
  kind, other = ('shape', 'colour') if shape is not None else ('colour', 'shape')
  erased_id = shape if kind == 'shape' else colour
  own = [p for p in base if world.parse(p)[_KINDS[kind][0]] == erased_id]

  def effect(key: str, k: int) -> dict[str, float]:
    prompts = [p for p in base if world.parse(p)[_KINDS[key][0]] == k and p not in own]
    before, after = mean_rate(base, key, prompts), mean_rate(erased, key, prompts)
    return {'before': before, 'after': after, 'drop': before - after}

  summary = {'concept': concept, 'kind': kind, 'base_rate': mean_rate(base, kind, own),
             'erased_rate': mean_rate(erased, kind, own),
             'others': {name: effect(kind, k) for k, name in enumerate(_KINDS[kind][1]) if k != erased_id},
             'other_kind': {name: effect(other, k) for k, name in enumerate(_KINDS[other][1])}}
  for key, group in ((kind, summary['others']), (other, summary['other_kind'])):
    measured = {name: o['drop'] for name, o in group.items() if np.isfinite(o['drop'])}  # prompts name it
    worst = max(measured, key=measured.get) if measured else None
    summary[f'worst_other_{key}'] = {'name': worst, 'drop': measured[worst] if worst else float('nan')}
  summary['max_other_drop'] = float(np.nanmax([summary['worst_other_shape']['drop'],
                                               summary['worst_other_colour']['drop']]))
  summary[f'kept_{other}'] = mean_rate(erased, other, own)
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
                    run: dict, original_cache: str | os.PathLike = '') -> dict:
  """Generates prompts × seeds with the original and each erased model ({name: (pipeline, concepts it
  erased)}), has the classifier name what each image shows, and writes workdir/report.json (`run` describes
  the erasure) and workdir/erasure.png (rows: prompts; columns: the first grid_seeds seeds of each model).
  The original's images come from `original_cache` when it holds them (original_images)."""
  start = time.perf_counter()
  generated = {'original': original_images(original, prompts, seeds, sampling, original_cache),
               **{name: generate_jax(model, prompts, seeds, sampling, desc=name) for name, (model, _) in erased.items()}}
  reports = {name: score(judge_model, prompts, batch) for name, batch in generated.items()}
  summaries = {name: [erasure_summary(reports['original'], reports[name], c) for c in concepts if world.is_concept(c)]
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
      other = 'colour' if s['kind'] == 'shape' else 'shape'
      others, across = (', '.join(f'{k} {v["before"]:.0%}→{v["after"]:.0%}' for k, v in s[group].items())
                        for group in ('others', 'other_kind'))
      print(f'[{name}] {s["concept"]}: shown in {s["base_rate"]:.0%} → {s["erased_rate"]:.0%} of the images of '
            f'prompts naming it, their {other} kept in {s[f"kept_{other}"]:.0%}; other {s["kind"]}s: {others}; '
            f'{other}s on prompts not naming it: {across}; largest drop {100 * s["max_other_drop"]:.0f} points')
  print(f'Report: {workdir / "report.json"}; grid: {grid}')
  return report
