"""One real SD-1.4-sized ESD iteration on this machine, through `main.py erase` itself.

    python benchmarks/sd_iteration.py                          # esd-x and esd-u, bf16 compute, remat none
    python benchmarks/sd_iteration.py --methods esd-x --remat blocks --dtype float32

A random pipeline with SD 1.4's UNet, VAE and text encoder configs (esd_jax.tiny.random_pipeline: our initialisers,
no torch; the text encoder keeps tiny's small vocabulary, with 77 positions) is written once as a diffusers folder.
Each run is `main.py erase` at 512 px (64×64 latents), 77-token prompts, batch 1, fp32 parameters and Adam, one
iteration, in a fresh process under /usr/bin/time: wall time and peak RSS.

The iteration takes the shortest sampler path, one DDIM step (the paper's convention, t_enc = 49): the run's
train.seed is chosen so that its first draw is t_enc = 49 (the draws are fold_in(key(seed), i), as in every run),
so nothing but the seed differs from a real run. Its work: the guided sampler's one step (2 UNet forwards), the
frozen model's 2 forwards and the student's forward and backward.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shortest_draw_seed(ddim_steps: int = 50) -> int:
  """The first train.seed whose iteration-0 draw (paper convention) is t_enc = ddim_steps - 1: one sampler step."""
  import jax

  from esd_jax import esd
  from esd_jax.tiny import SCHEDULER
  objective = esd.Objective(ddim_steps=ddim_steps)
  scheduler = objective.scheduler(dict(SCHEDULER))
  for seed in range(10_000):
    draws = esd.draw(jax.random.fold_in(jax.random.key(seed), 0), objective, scheduler, batch=1,
                     latent_shape=(1, 1, 1), num_concepts=1)
    if int(draws.step) == ddim_steps - 1:
      return seed
  raise RuntimeError('no seed draws the shortest path')


def build(folder: Path) -> None:
  from esd_jax.loading import component_config
  from esd_jax.tiny import random_pipeline
  config = lambda name: component_config('sd-v1-4', '.', name)
  start = time.perf_counter()
  random_pipeline(folder, unet=config('unet'), vae=config('vae'), text_encoder=config('text_encoder'),
                  max_length=77)
  print(f'random SD 1.4 pipeline built and written in {time.perf_counter() - start:.0f} s: {folder}', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--methods', nargs='+', default=['esd-x', 'esd-u'])
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--remat', default='none')
  parser.add_argument('--folder', type=Path, help='the random pipeline (built here when missing)')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix='esd-jax-sd-') as tmp:
    folder = args.folder or Path(tmp) / 'sd14-random'
    if not (folder / 'model_index.json').is_file():
      build(folder)
    seed = shortest_draw_seed()
    rows = []
    for method in args.methods:
      command = ['/usr/bin/time', '-v', sys.executable, str(ROOT / 'main.py'), 'erase', f'--config.model={folder}',
                 f'--config.workdir={Path(tmp) / method}', f'--config.erase.method={method}',
                 '--config.erase.concepts=("Van Gogh",)', '--config.train.iterations=1',
                 f'--config.train.seed={seed}', f'--config.train.compute_dtype={args.dtype}',
                 f'--config.train.remat={args.remat}', '--config.evaluate.classifier=',
                 "--config.export.formats=('trained',)"]
      start = time.perf_counter()
      result = subprocess.run(command, capture_output=True, text=True)
      wall = time.perf_counter() - start
      rss = re.search(r'Maximum resident set size \(kbytes\): (\d+)', result.stderr)
      signal = re.search(r'Command terminated by signal (\d+)', result.stderr)
      if result.returncode == 0:
        status = 'ok'
      elif signal and signal.group(1) == '9' or result.returncode == 137:
        status = 'killed (SIGKILL: the kernel\'s out-of-memory killer on this 24 GB machine)'
      else:
        errors = [line for line in result.stderr.splitlines() if line.strip() and 'esd-jax' in line]
        status = f'exit {result.returncode}: ' + (errors[-1][:200] if errors else 'see the run\'s stderr')
      rows.append((method, wall, int(rss.group(1)) / 2 ** 20 if rss else float('nan'), status))
      print(f'{method}: {wall:.0f} s, peak RSS {rows[-1][2]:.1f} GiB, {status}', flush=True)
  print(f'\nSD 1.4-sized random weights, 512 px, {args.dtype} compute, remat {args.remat}, one iteration '
        f'(t_enc = 49: one sampler step; train.seed {seed})\n')
  print('| method | wall s (process, compile included) | peak RSS GiB | result |')
  print('|---|---:|---:|---|')
  for method, wall, rss, status in rows:
    print(f'| {method} | {wall:.0f} | {rss:.1f} | {status} |')


if __name__ == '__main__':
  main()
