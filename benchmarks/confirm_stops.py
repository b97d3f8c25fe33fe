"""Would a confirmed stop (probe.confirm_seeds) have stopped the runs of an any-concept sweep where they stopped?

    python benchmarks/confirm_stops.py --out outputs/any_concept [--confirm-seeds 48]

For every run folder CONCEPT-SEED under --out (benchmarks/any_concept.py's) that the probe stopped, the model it
stopped with (probe/best.safetensors, the exported one) is probed again as configs/any_concept.py's probe would with
--config.probe.confirm_seeds: first on the probe's own seeds (which must reproduce the reading the run logged), then on
the confirmation seeds, all images pooled. A run whose pooled reading still meets the criteria would have stopped at
the same iteration with the same model, so its final measurement stands unchanged; one whose pooled reading fails
would have trained on, and must be run again with the confirmation.
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
  parser.add_argument('--out', type=Path, default=Path('outputs/any_concept'))
  parser.add_argument('--confirm-seeds', type=int, default=48)
  parser.add_argument('--runs', nargs='*', help='run folder names (CONCEPT-SEED); default: every one under --out')
  args = parser.parse_args()

  from safetensors.numpy import load_file

  from configs.any_concept import get_config
  from esd_jax.commands import weights_overlay
  from esd_jax.loading import load_model
  from esd_jax.shapes_world.measure import load_judge
  from esd_jax.shapes_world.probe import ShapesProbe

  config = get_config()
  settings = config.probe.copy_and_resolve_references()
  settings.confirm_seeds = args.confirm_seeds
  pipe = load_model(config)
  probe = ShapesProbe(pipe, load_judge(), [], settings)
  pct = lambda r: f'{100 * r.numbers["shown"]:.1f} % shown, worst drop {100 * r.numbers["worst_drop"]:.1f}'
  print(f'| run | stopped at | logged ({settings.seeds} seeds) | again ({settings.seeds} seeds) | pooled '
        f'({settings.seeds + args.confirm_seeds} seeds) | confirmed |')
  print('|---|---:|---|---|---|---|', flush=True)
  confirmed = []
  runs = [args.out / name for name in args.runs] if args.runs else sorted(args.out.iterdir())
  for run in [r for r in runs if (r / 'probe' / 'best.json').is_file()]:
    best = json.loads((run / 'probe' / 'best.json').read_text())
    if not best['met']:
      continue
    probe.concepts = [run.name.rsplit('-', 1)[0]]
    trained = weights_overlay(pipe, load_file(run / 'probe' / 'best.safetensors'))
    images = probe.draw(trained, 0, settings.seeds)
    again = probe.reading(images)
    pooled = probe.confirmed(trained, images)
    confirmed.append(pooled.met)
    print(f'| {run.name} | {best["step"]} | {100 * best["shown"]:.1f} % shown, worst drop '
          f'{100 * best["worst_drop"]:.1f} | {pct(again)} | {pct(pooled)} | {"yes" if pooled.met else "no"} |',
          flush=True)
  print(f'\nconfirmed: {sum(confirmed)} of {len(confirmed)} stops')


if __name__ == '__main__':
  main()
