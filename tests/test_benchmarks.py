"""The accelerator benchmark (benchmarks/device.py) runs end to end on CPU with the tiny model: the CI smoke test of
the script a chip will run."""

import json
import subprocess
import sys
from pathlib import Path

from tests.multihost import env

ROOT = Path(__file__).resolve().parents[1]


def test_device_benchmark_smoke(tmp_path):
  out = tmp_path / 'device.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'device.py'), '--small', '--dtype', 'float32', '--reps', '1',
       '--cases', 'esd-x:1:2', 'esd-u:1:1', '--budget-s', '0.001', '--json', str(out)],
      cwd=tmp_path, env=env(1), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  done, skipped = report['rows'][0], report['rows'][1:]
  # Two separate ESD-x models, batch 1; the budget ran out after that first case: the next is reported as skipped.
  assert done['case'] == 'esd-x:1:2' and done['models'] == 2
  assert [r['case'] for r in skipped] == ['esd-u:1:1'] and 'skipped' in skipped[0]
  ms = done['ms']
  assert ms['iteration_t_enc_25'] > ms['iteration_t_enc_49'] > 0  # 25 sampler steps take longer than one
  assert ms['frozen_forwards'] > 0 and ms['sampling_per_step'] > 0 and done['unet_images_per_s'] > 0
  assert done['tflop']['iteration_mean_draw'] > done['tflop']['iteration_t_enc_49'] > done['tflop']['unet_forward']
  assert done['mfu']['mean_draw'] is None  # no peak is known for a CPU
  assert '| esd-x:1:2 |' in result.stdout and '| esd-u:1:1 | skipped: budget' in result.stdout
