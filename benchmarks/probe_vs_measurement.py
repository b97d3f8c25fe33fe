"""Does the probe read a model as the final measurement does? For finished any-concept runs, the exported model
(probe/best.safetensors) is probed on 64 probe seeds (1000…) at 25 and at 50 DDIM steps, next to the final
measurement's worst losses (report.json: seeds 0…63, 50 steps):

    python benchmarks/probe_vs_measurement.py outputs/any_concept/blue-1 outputs/any_concept/square-2

Where the probe and the measurement disagree at equal steps, it is the seeds: the chance error of the criteria
themselves (README "Erasing any concept").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', type=Path, help='run folders CONCEPT-SEED of benchmarks/any_concept.py')
  parser.add_argument('--seeds', type=int, default=64)
  parser.add_argument('--steps', nargs='+', type=int, default=[25, 50])
  args = parser.parse_args()

  from safetensors.numpy import load_file

  from configs.any_concept import get_config
  from esd_jax.commands import weights_overlay
  from esd_jax.loading import load_model
  from esd_jax.shapes_world.measure import load_judge
  from esd_jax.shapes_world.probe import ShapesProbe

  config = get_config()
  pipe, judge = load_model(config), load_judge()
  probes = {}
  for steps in args.steps:
    settings = config.probe.copy_and_resolve_references()
    settings.seeds, settings.confirm_seeds, settings.steps = args.seeds, 0, steps
    probes[steps] = ShapesProbe(pipe, judge, [], settings)
  points = lambda x: f'{100 * x:.1f}'
  print('| run | measurement: worst other shape; colour | '
        + ' | '.join(f'probe, {args.seeds} seeds × {s} steps: shown; shape; colour lost' for s in args.steps) + ' |')
  print('|---|---|' + '---|' * len(args.steps), flush=True)
  for run in args.runs:
    summary = json.loads((run / 'report.json').read_text())['models']['erased']['summary'][0]
    trained = weights_overlay(pipe, load_file(run / 'probe' / 'best.safetensors'))
    cells = [f"{w['name']} {points(w['drop'])}" for w in (summary['worst_other_shape'], summary['worst_other_colour'])]
    row = [run.name, '; '.join(cells)]
    for probe in probes.values():
      probe.concepts = [run.name.rsplit('-', 1)[0]]
      steps = probe.settings.steps
      reading = probe.reading(probe.draw(trained, 0, args.seeds, steps), steps, probe.settings.max_drop).numbers
      row.append('; '.join(points(reading[k]) for k in ('shown', 'shape_drop', 'colour_drop')))
    print('| ' + ' | '.join(row) + ' |', flush=True)


if __name__ == '__main__':
  main()
