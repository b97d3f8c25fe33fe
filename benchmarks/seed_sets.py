"""The final measurement's chance error: finished any-concept runs' exported models (erased/unet_trained.safetensors)
measured as the final measurement measures them (50 DDIM steps, the judge, against the original model from the same
noise), on several disjoint sets of image seeds — set k is seeds 64k … 64k + 63, set 0 the report's own:

    python benchmarks/seed_sets.py outputs/sweep15/yellow-0 outputs/sweep15/blue-1 --sets 0 1 2 3

One row per run and set: the concept shown, the worst other shape's and colour's points lost. How far the sets
differ on one model is how far a 64-seed criterion (≤ 5 % shown, ≤ 3 points lost) can be from the model's truth,
and how far a stop rule that reads the model on its own seeds can be from the measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', type=Path, help='run folders CONCEPT-SEED of benchmarks/any_concept.py')
  parser.add_argument('--sets', nargs='+', type=int, default=[0, 1, 2, 3])
  parser.add_argument('--seeds', type=int, default=64, help='seeds per set')
  parser.add_argument('--cache', default='', help="folder keeping the original model's images between calls")
  args = parser.parse_args()

  import numpy as np
  from safetensors.numpy import load_file

  from configs.any_concept import get_config
  from convert.erased import erased_pipeline
  from esd_jax.loading import load_model
  from esd_jax.shapes_world.measure import (Sampling, erasure_summary, generate_jax, load_judge, original_images,
                                            score)
  from esd_jax.shapes_world.world import PROMPTS

  config = get_config()
  pipe, judge, sampling = load_model(config), load_judge(), Sampling(steps=config.evaluate.steps)
  seed_sets = {k: range(k * args.seeds, (k + 1) * args.seeds) for k in args.sets}
  base = {k: score(judge, PROMPTS, original_images(pipe, PROMPTS, seeds, sampling, args.cache))
          for k, seeds in seed_sets.items()}
  points = lambda x: f'{100 * x:.1f}'
  print('| run | seeds | shown | worst other shape (points lost) | worst other colour (points lost) |')
  print('|---|---|---:|---|---|', flush=True)
  for run in args.runs:
    erased = erased_pipeline(pipe, load_file(run / 'erased' / 'unet_trained.safetensors'))
    worst = []
    for k, seeds in seed_sets.items():
      summary = erasure_summary(base[k], score(judge, PROMPTS, generate_jax(erased, PROMPTS, seeds, sampling)),
                                run.name.rsplit('-', 1)[0])
      shape, colour = summary['worst_other_shape'], summary['worst_other_colour']
      worst.append(max(shape['drop'], colour['drop']))
      print(f'| {run.name} | {seeds.start}–{seeds.stop - 1} | {points(summary["erased_rate"])} | {shape["name"]} '
            f'{points(shape["drop"])} | {colour["name"]} {points(colour["drop"])} |', flush=True)
    print(f'| {run.name} | all {len(worst)} sets | | worst other concept: mean {points(np.mean(worst))}, '
          f'range {points(min(worst))}–{points(max(worst))} | |', flush=True)


if __name__ == '__main__':
  main()
