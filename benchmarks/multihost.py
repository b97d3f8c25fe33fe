"""Several processes against one: the shapes-world default erasure run by N local processes (tests/multihost.py's
launcher, gloo collectives on CPU) and by one process with the same number of devices and the same mesh.

    python benchmarks/multihost.py                       # 2 processes × 2 devices vs 1 × 4; 20 iterations
    python benchmarks/multihost.py --iterations 40 --layouts fsdp=4 data=2,fsdp=2 --batch-size 2

Each run is `main.py erase` on configs/default.py (ESD-x, "circle", the paper's convention; no measuring, trained
tensors exported) in a fresh workdir. From its metrics.jsonl: the first iteration's seconds (compilation, and
with several processes the first cross-process collectives), the median seconds of the others, and the run's wall
time (start-up, loading and export included). The ratio is N processes / one process (> 1: several processes are
slower). A layout names the mesh axes (unnamed ones are 1); the devices are ordered process by process, so the
last axes lie inside a process and the first span processes. `data=4` with the default batch of 1 replicates
everything (no collectives: the baseline of running N processes at all); `fsdp=4` shards every tensor of at least
--min-shard-size elements over both processes (the shapes-world UNet's tensors are small: the default 4096 shards
most of them; the config's 2^18 would shard none); `data=2,fsdp=2` with --batch-size 2 shards inside each process
and splits the batch across them.

What this measures is the price of gloo's TCP collectives between processes of one 2-core machine, where the
processes also share the cores. It is not a TPU or GPU figure: on a pod the collectives run over ICI/NVLink.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.multihost import check_all_succeeded, launch, main_py  # noqa: E402

AXES = ('data', 'fsdp', 'concept')


def mesh_flags(layout: str) -> list[str]:
  sizes = dict(part.split('=') for part in layout.split(','))
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise SystemExit(f'Unknown mesh axis {sorted(unknown)} in {layout!r}; axes: {AXES}.')
  return [f'--config.mesh.{axis}={sizes.get(axis, 1)}' for axis in AXES]


def erase_args(workdir: Path, args: argparse.Namespace, layout: str) -> list[str]:
  return ['erase', f'--config.workdir={workdir}', f'--config.train.iterations={args.iterations}',
          f'--config.train.checkpoint_every={args.iterations}', f'--config.train.batch_size={args.batch_size}',
          f'--config.mesh.min_shard_size={args.min_shard_size}', '--config.evaluate.classifier=',
          "--config.export.formats=('trained',)", *mesh_flags(layout)]


def timings(workdir: Path, wall: float) -> dict:
  seconds = [json.loads(line)['seconds'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {'first_s': seconds[0], 'median_s': statistics.median(seconds[1:]), 'wall_s': wall}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices', type=int, default=2, help='emulated CPU devices per process')
  parser.add_argument('--iterations', type=int, default=20)
  parser.add_argument('--layouts', nargs='+', default=['data=4', 'fsdp=4'])
  parser.add_argument('--batch-size', type=int, default=1)
  parser.add_argument('--min-shard-size', type=int, default=4096)
  parser.add_argument('--json', type=Path, help='also write the results here')
  args = parser.parse_args()
  total = args.processes * args.devices
  rows = []
  with tempfile.TemporaryDirectory(prefix='esd-jax-multihost-') as tmp:
    for layout in args.layouts:
      row = {'layout': layout}
      for name, processes in (('one', 1), ('several', args.processes)):
        workdir = Path(tmp) / f'{layout}-{name}'
        start = time.perf_counter()
        if processes == 1:
          main_py(erase_args(workdir, args, layout), devices=total, cwd=tmp, timeout=3600)
        else:
          check_all_succeeded(launch(erase_args(workdir, args, layout), processes=processes,
                                     devices=args.devices, cwd=tmp, timeout=3600))
        row[name] = timings(workdir, time.perf_counter() - start)
      rows.append(row)
  several = f'{args.processes} processes × {args.devices}'
  print(f'\nshapes-world default erasure, {args.iterations} iterations; 1 process × {total} devices against '
        f'{several} (gloo on CPU: not a TPU figure)\n')
  print(f'| layout | | 1 × {total} | {several} | ratio |')
  print('|---|---|---:|---:|---:|')
  for row in rows:
    for key, label in (('median_s', 'median s / iteration'), ('first_s', 'first iteration s'),
                       ('wall_s', 'wall s (run)')):
      one, many = row['one'][key], row['several'][key]
      print(f'| {row["layout"]} | {label} | {one:.3f} | {many:.3f} | {many / one:.2f} |')
  if args.json:
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == '__main__':
  main()
