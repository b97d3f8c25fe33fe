"""Would configs/any_concept.py's confirmation have stopped the runs of an any-concept sweep where they stopped?

    python benchmarks/confirm_stops.py --out outputs/any_concept [--runs yellow-0 blue-1]

For every run folder CONCEPT-SEED under --out (benchmarks/any_concept.py's) that the probe stopped, the model it
stopped with (probe/best.safetensors, the exported one) is read by the config's confirmation (probe.confirm_seeds,
confirm_steps, confirm_max_drop): the probe's seeds and the confirmation's, pooled. Erase-until changes nothing
but when a run stops, so a run of an earlier procedure (same settings but the confirmation) whose model passes would
have stopped there again with the same model, and its final measurement stands, unless the confirmation had passed
one of its earlier attempts, which that procedure failed (listed: their models are not kept); a run that fails would
have trained on, and must be run again.
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
  pipe = load_model(config)
  probe = ShapesProbe(pipe, load_judge(), [], settings)
  pct = lambda numbers: f'{100 * numbers["shown"]:.1f} % shown, worst drop {100 * numbers["worst_drop"]:.1f}'
  pooled = settings.seeds + settings.confirm_seeds
  print(f'| run | stopped at | logged | earlier attempts | confirmation ({pooled} seeds × {settings.confirm_steps} '
        f'steps, ≤ {100 * settings.confirm_max_drop:g} points) | confirmed |')
  print('|---|---:|---|---|---|---|', flush=True)
  confirmed = []
  runs = [args.out / name for name in args.runs] if args.runs else sorted(args.out.iterdir())
  for run in [r for r in runs if (r / 'probe' / 'best.json').is_file()]:
    best = json.loads((run / 'probe' / 'best.json').read_text())
    if not best['met']:
      continue
    events = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    earlier = [e for e in events
               if e.get('event') == 'probe' and e['seeds'] > settings.seeds and e['step'] < best['step']]
    probe.concepts = [run.name.rsplit('-', 1)[0]]
    trained = weights_overlay(pipe, load_file(run / 'probe' / 'best.safetensors'))
    reading = probe.confirmed(trained)
    confirmed.append(reading.met)
    print(f'| {run.name} | {best["step"]} | {pct(best)} ({best["seeds"]} seeds) | '
          + ('; '.join(f'{e["step"]}: {pct(e)}' for e in earlier) or 'none')
          + f' | {pct(reading.numbers)} | {"yes" if reading.met else "no"} |', flush=True)
  print(f'\nconfirmed: {sum(confirmed)} of {len(confirmed)} stops')


if __name__ == '__main__':
  main()
