"""One procedure for every concept: erase each of the shapes world's 8 concepts with the same command, only the
concept (and the training seed) changed, and measure each erased model against the original with the judge.

    python benchmarks/any_concept.py                                     # 8 concepts × seeds 0 1 2, 64 images/prompt
    python benchmarks/any_concept.py --concepts square red --seeds 0 --eval-seeds 16 --out /tmp/any
    python benchmarks/any_concept.py --config configs/default.py --set train.iterations=200   # plain ESD, compared
    python benchmarks/any_concept.py --grid docs/images/any_concept.png   # + the runs' pictures, one per seed
    python benchmarks/any_concept.py --measured-only                      # the table of a sweep in progress

Each run is `main.py erase --config=CONFIG --config.erase.concepts="('CONCEPT',)" --config.train.seed=SEED` in its own
workdir under --out; the original model's images are generated once (--out/original), and a run already measured
is read, not run again: an interrupted sweep resumes. Printed, one row per run and a verdict against the issue's
criteria: the concept shown in ≤ 5 % of the images of prompts naming it; every other shape's and colour's accuracy
within 3 points of the original model's (the honest judge: an image judged "none" keeps nothing); what those
prompts' images keep of the other kind (a shape erasure: their colour; a colour erasure: their shape), not a
criterion; iterations used (the probe's stop or best, else train.iterations), wall time. With --grid, a PNG per
training seed: a row per concept, the 4 prompts naming it drawn by the original and the erased model side by side, then
3 of the world's other prompts (each with another shape and another colour) drawn by the erased model; image seed 0,
the final measurement's first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ('circle', 'square', 'triangle', 'cross', 'red', 'green', 'blue', 'yellow')
MAX_SHOWN, MAX_DROP = 0.05, 0.03


def run(config: Path, concept: str, seed: int, workdir: Path, eval_seeds: int, overrides: list[str]) -> dict:
  report = workdir / 'report.json'
  if not report.is_file():
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / 'main.py'), 'erase', f'--config={config}', f'--config.workdir={workdir}',
         f'--config.erase.concepts=({concept!r},)', f'--config.train.seed={seed}',
         f'--config.evaluate.seeds={eval_seeds}', f'--config.evaluate.original_cache={workdir.parent / "original"}',
         "--config.export.formats=('trained',)",
         *[f'--config.{o}' for o in overrides]], capture_output=True, text=True)
    if result.returncode:
      return {'error': result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'failed'}
    (workdir / 'wall_seconds.txt').write_text(f'{time.perf_counter() - start:.1f}\n')
  summary = json.loads(report.read_text())['models']['erased']['summary'][0]
  best = workdir / 'probe' / 'best.json'
  steps = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  iterations = json.loads(best.read_text())['step'] if best.is_file() else max(r['step'] for r in steps)
  wall = workdir / 'wall_seconds.txt'
  return {'concept': concept, 'seed': seed, 'base': summary['base_rate'], 'shown': summary['erased_rate'],
          'worst_shape': summary['worst_other_shape'], 'worst_colour': summary['worst_other_colour'],
          'kept': summary['kept_colour' if summary['kind'] == 'shape' else 'kept_shape'], 'iterations': iterations, 'seconds': float(wall.read_text()) if wall.is_file() else None,
          'ok': summary['erased_rate'] <= MAX_SHOWN and summary['max_other_drop'] <= MAX_DROP}


def save_grid(path: Path, out: Path, concepts, seed: int) -> None:
  """The picture of training seed `seed`'s runs (module docstring), written to `path`."""
  sys.path.insert(0, str(ROOT))
  from safetensors.numpy import load_file

  from configs.any_concept import get_config
  from esd_jax.commands import weights_overlay
  from esd_jax.generate import text_to_image_models
  from esd_jax.images import save_grid as write_grid
  from esd_jax.loading import load_model
  from esd_jax.shapes_world.world import PROMPTS

  config = get_config()
  pipe = load_model(config)
  done = [c for c in concepts if (out / f'{c}-{seed}' / 'erased' / 'unet_trained.safetensors').is_file()]
  overlays = [{}] + [weights_overlay(pipe, load_file(out / f'{c}-{seed}' / 'erased' / 'unet_trained.safetensors'))
                     for c in done]
  images = text_to_image_models(pipe, overlays, PROMPTS, [0])[:, 0]  # (models, prompts, H, W, 3)
  rows, labels = [], []
  for m, concept in enumerate(done, start=1):
    naming = [i for i, p in enumerate(PROMPTS) if concept in p.split()]
    others, used = [], set()  # a prompt per other shape (colour): each with a shape and a colour not shown yet
    for i, p in enumerate(PROMPTS):
      if concept not in p.split() and not used & set(p.split()[1:]):
        others.append(i)
        used |= set(p.split()[1:])
    rows.append([images[model, i] for i in naming for model in (0, m)] + [images[m, i] for i in others])
    other_word = lambda i: ' '.join(w for w in PROMPTS[i].split()[1:] if w != concept)
    labels.append(f'{concept}: ' + ', '.join(map(other_word, naming)))
  columns = ['original', 'erased'] * 4 + ['erased: other prompts', '', '']
  write_grid(path, rows, row_labels=labels, col_labels=columns)
  print(f'grid: {path}')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', type=Path, default=ROOT / 'configs' / 'any_concept.py')
  parser.add_argument('--concepts', nargs='+', default=list(CONCEPTS), choices=CONCEPTS)
  parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
  parser.add_argument('--eval-seeds', type=int, default=64, help='images per prompt of the final measurement')
  parser.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE', help='config overrides for every run')
  parser.add_argument('--out', type=Path, default=Path('outputs/any_concept'))
  parser.add_argument('--json', type=Path, help='also write the rows here')
  parser.add_argument('--measured-only', action='store_true',
                      help='the rows of the runs already measured, training none (a sweep in progress)')
  parser.add_argument('--grid', type=Path, help='also draw the runs (module docstring): a PNG per training seed, '
                      'named with -seed{S} unless one seed runs')
  args = parser.parse_args()
  drop = lambda w: f'{w["name"]} {100 * w["drop"]:.1f}' if w['name'] else '—'  # negative: gained
  print(f'config {args.config.name} {" ".join(args.set)}; {args.eval_seeds} images per prompt\n')
  print('| concept | seed | shown (original → erased) | worst other shape (points lost) | worst other colour '
        '(points lost) | kept | iterations | minutes | criteria |')
  print('|---|---:|---|---|---|---:|---:|---:|---|', flush=True)
  rows = []
  for concept in args.concepts:
    for seed in args.seeds:
      if args.measured_only and not (args.out / f'{concept}-{seed}' / 'report.json').is_file():
        continue
      r = run(args.config, concept, seed, args.out / f'{concept}-{seed}', args.eval_seeds, args.set)
      rows.append(r)
      if 'error' in r:
        print(f'| {concept} | {seed} | {r["error"]} |', flush=True)
        continue
      minutes = f'{r["seconds"] / 60:.1f}' if r['seconds'] else '—'
      print(f'| {concept} | {seed} | {r["base"]:.0%} → {r["shown"]:.1%} | {drop(r["worst_shape"])} | '
            f'{drop(r["worst_colour"])} | {r["kept"]:.0%} | {r["iterations"]} | {minutes} | {"met" if r["ok"] else "not met"} |',
            flush=True)
  done = [r for r in rows if 'error' not in r]
  print(f'\ncriteria met in {sum(r["ok"] for r in done)} of {len(done)} runs')
  if args.json:
    args.json.write_text(json.dumps(rows, indent=2))
  for seed in args.seeds if args.grid else ():
    path = args.grid if len(args.seeds) == 1 else args.grid.with_stem(f'{args.grid.stem}-seed{seed}')
    save_grid(path, args.out, args.concepts, seed)


if __name__ == '__main__':
  main()
