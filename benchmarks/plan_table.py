"""Which Stable Diffusion erasures fit which chips: `main.py plan` (esd_jax/cost.py) over models × methods × compute
dtypes × remat × meshes (and one train.frozen_dtype), as one markdown table.

    python benchmarks/plan_table.py                                   # the whole grid (hours on 2 CPU cores)
    python benchmarks/plan_table.py --models sd-v1-4 --meshes 1 --json plan.jsonl

With --json, each row is appended to that file as it completes, and a row already there is not compiled again:
an interrupted grid resumes where it stopped, and --table-only prints the table of the file.

Every row is one `main.py plan` in its own process (emulated CPU devices stand for the chips: plan.devices), on the
reference configs (no weights), 512 px for SD 1.4, 768 px for SD 2.1, 1024 px for SDXL (their native sizes), batch
1, the paper's convention. Memory is XLA's per device: arguments (frozen base, trained subset, Adam moments, the
step's inputs) + outputs − donated + temporaries. XLA:CPU's buffer assignment estimates what the TPU and GPU
compilers would allocate, not more. The last columns mark the chip sizes the total fits: 16 GB (v5e), 32 GB (v4),
95 GB (v5p), 141 GB (H200); GB here are 10^9 bytes, as chip memory is quoted.

The plans compile with XLA_FLAGS=--xla_backend_optimization_level=0 (--optimize undoes it): that is LLVM's
optimisation of the CPU machine code, after XLA's HLO passes and buffer assignment, so it changes no number in the
table (checked on SD 1.4 ESD-x float32, one chip, and ESD-u bfloat16 on fsdp 8) and halves a compile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHIPS_GB = (16, 32, 95, 141)
CONCEPTS = ('Van Gogh', 'Picasso', 'Monet', 'Rembrandt', 'Dali', 'Klimt', 'Hokusai', 'Kahlo')
# name → (devices, config flags)
MESHES = {
    '1': (1, ['--config.mesh.data=1', '--config.mesh.fsdp=1']),
    'fsdp8': (8, ['--config.mesh.data=1', '--config.mesh.fsdp=8']),
    'data2xfsdp4': (8, ['--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.train.batch_size=2']),
    'concept8': (8, ['--config.mesh.concept=8', '--config.mesh.data=1', '--config.mesh.fsdp=1',
                     '--config.erase.separate_models=True', f'--config.erase.concepts={CONCEPTS!r}']),
}


def plan(model: str, method: str, dtype: str, remat: str, mesh: str, out: Path, frozen: str, attention: str,
         optimize: bool) -> dict:
  devices, flags = MESHES[mesh]
  env = dict(os.environ)
  if not optimize:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
  start = time.perf_counter()
  result = subprocess.run(
      [sys.executable, str(ROOT / 'main.py'), 'plan', f'--config.model={model}', f'--config.erase.method={method}',
       f'--config.train.compute_dtype={dtype}', f'--config.train.remat={remat}',
       f'--config.train.frozen_dtype={frozen}', f'--config.attention={attention}', f'--config.plan.devices={devices}',
       f'--config.plan.json={out}', '--config.erase.concepts=("Van Gogh",)', *flags],
      capture_output=True, text=True, env=env)
  if result.returncode:
    return {'error': result.stderr.strip().splitlines()[-1]}
  return {**json.loads(out.read_text()), 'compile_s': round(time.perf_counter() - start, 1), 'mesh_name': mesh}


def row(r: dict) -> str:
  gib = lambda key: r['per_device_bytes'][key] / 2 ** 30
  state = gib('frozen_base') + gib('trained') + gib('adam')
  total_gb = r['per_device_bytes']['total'] / 1e9
  fits = ' | '.join('✓' if total_gb <= chip else '' for chip in CHIPS_GB)
  frozen = r['frozen_dtype']
  compute = r['compute_dtype'] + ('' if frozen == r['compute_dtype'] else f', frozen base {frozen}')
  return (f'| {r["model"]} | {r["method"]} | {compute} | {r["remat"]} | {r["attention"]} | {r["mesh_name"]} | '
          f'{state:.2f} | {gib("temporaries"):.2f} | {gib("total"):.2f} | '
          f'{r["flops"]["xla_per_iteration"] / 1e12:.2f} | {fits} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', nargs='+', default=['sd-v1-4', 'sd-v2-1', 'sdxl-base-1.0'])
  parser.add_argument('--methods', nargs='+', default=['esd-x', 'esd-u'])
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--remat', nargs='+', default=['none', 'blocks'])
  parser.add_argument('--meshes', nargs='+', default=list(MESHES), choices=list(MESHES))
  parser.add_argument('--frozen-dtype', default='auto', help='train.frozen_dtype of every row')
  parser.add_argument('--attention', nargs='+', default=['chunked'],
                      help='attention implementations (chunked: no whole score matrix, as the fused kernels of TPUs '
                           'and GPUs; xla: the reference, scores whole)')
  parser.add_argument('--json', type=Path, help='append every row to this JSON-lines file; rows already in it are '
                                                 'not compiled again')
  parser.add_argument('--table-only', action='store_true', help='print the table of the --json file, compile nothing')
  parser.add_argument('--optimize', action='store_true', help="compile with LLVM's optimisations (same numbers, "
                                                               'twice the time)')
  args = parser.parse_args()
  done = [json.loads(line) for line in args.json.read_text().splitlines()] if args.json and args.json.exists() else []
  print('| model | method | compute | remat | attention | mesh | frozen + trained + Adam GiB | temporaries GiB | '
        'total GiB | TFLOP / iteration (XLA) | ' + ' | '.join(f'{c} GB' for c in CHIPS_GB) + ' |')
  print('|' + '---|' * 6 + '---:|' * 4 + '---|' * len(CHIPS_GB), flush=True)
  if args.table_only:
    for r in done:
      print(row(r), flush=True)
    return
  with tempfile.TemporaryDirectory() as tmp:
    for model, method, dtype, remat, attention, mesh in itertools.product(
        args.models, args.methods, args.dtypes, args.remat, args.attention, args.meshes):
      if mesh == 'concept8' and method != 'esd-x':
        continue  # separate models are ESD-x's use: 8 × ESD-u state is 8 full UNets
      key = {'model': model, 'method': method, 'compute_dtype': dtype, 'remat': remat, 'attention': attention,
             'mesh_name': mesh, 'frozen_option': args.frozen_dtype}
      previous = [r for r in done if all(r.get(k) == v for k, v in key.items())]
      r = previous[0] if previous else plan(model, method, dtype, remat, mesh, Path(tmp) / 'plan.json',
                                            args.frozen_dtype, attention, args.optimize)
      if 'error' in r:
        print(f'| {model} | {method} | {dtype} | {remat} | {attention} | {mesh} | {r["error"]} |', flush=True)
        continue
      print(row(r), flush=True)
      if args.json and not previous:
        with args.json.open('a') as f:
          f.write(json.dumps({**r, **key}) + '\n')


if __name__ == '__main__':
  main()
