"""ESD runs: sharding over a mesh, kill-and-resume, and bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.default import get_config
from esd_jax.checkpoints import Checkpoints
from esd_jax.errors import RunError
from esd_jax.train import run_erasure
from esd_jax.workdir import lock_workdir

ROOT = Path(__file__).resolve().parents[1]


def _config(model, workdir, **train):
  config = get_config()
  config.model, config.workdir = str(model), str(workdir)
  config.erase.method, config.erase.ddim_steps = 'esd-x', 10
  config.train.update({'iterations': 4, 'checkpoint_every': 2, **train})
  return config


def test_sharded_run_equals_single_device_and_splits_tensors(model, tmp_path):
  def run(devices, data, fsdp):
    out = tmp_path / f'{devices}.npz'
    subprocess.run([sys.executable, str(ROOT / 'tests' / 'sharded_erase.py'), str(devices), str(data), str(fsdp),
                    str(model), str(tmp_path / f'w{devices}'), str(out)], check=True, timeout=600, cwd=tmp_path)
    return np.load(out)

  one, eight = run(1, 1, 1), run(8, 2, 4)
  keys = [k for k in one.files if '/' not in k]
  assert len(keys) == 20  # esd-x on the small UNet
  flat = lambda run: np.concatenate([np.ravel(run[k]) for k in keys])
  assert np.linalg.norm(flat(eight) - flat(one)) / np.linalg.norm(flat(one)) <= 1e-5
  split = [k for k in keys if eight['split/' + k]]
  large = [k for k in keys if one[k].size >= 2048]
  assert split and set(split) == set(large)  # every large tensor lives in pieces, the others replicated
  assert all('fsdp' in str(eight['spec/' + k]) for k in split)
  assert not any(one['split/' + k] for k in keys)


def _erase_cli(model, workdir, iterations):
  return [sys.executable, str(ROOT / 'main.py'), 'erase', f'--config.model={model}', f'--config.workdir={workdir}',
          f'--config.train.iterations={iterations}', '--config.train.checkpoint_every=2',
          '--config.erase.ddim_steps=4', '--config.train.learning_rate=1e-4', '--config.erase.method=esd-x',
          "--config.export.formats=('trained',)", '--config.evaluate.classifier=']


def test_sigkill_then_resume_equals_uninterrupted(model, tmp_path):
  full = subprocess.run(_erase_cli(model, tmp_path / 'full', 6), capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-2000:]
  proc = subprocess.Popen(_erase_cli(model, tmp_path / 'killed', 6), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  checkpoint = tmp_path / 'killed' / 'checkpoints' / '2'
  deadline = time.time() + 500
  while not checkpoint.is_dir() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert checkpoint.is_dir(), 'the run ended before its step-2 checkpoint'
  done = len((tmp_path / 'killed' / 'metrics.jsonl').read_text().splitlines())
  assert done < 6, 'the run was not interrupted'
  resumed = subprocess.run(_erase_cli(model, tmp_path / 'killed', 6), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'esd-jax: Resumed from step 2' in resumed.stderr
  # A quiet console: esd-jax's lines and the progress bar, none of the libraries' INFO logs (orbax's, absl-formatted).
  assert not [line for line in full.stderr.splitlines() if re.match(r'I\d{4} ', line)], full.stderr[-3000:]
  a = load_file(tmp_path / 'full' / 'erased' / 'unet_trained.safetensors')
  b = load_file(tmp_path / 'killed' / 'erased' / 'unet_trained.safetensors')
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  steps = [line for line in (tmp_path / 'killed' / 'metrics.jsonl').read_text().splitlines()]
  assert len(steps) == 6  # lines past the restored checkpoint were dropped, then written again


def test_ctrl_c_says_where_it_stopped_and_that_a_rerun_resumes(model, tmp_path):
  proc = subprocess.Popen(_erase_cli(model, tmp_path, 500), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  checkpoint = tmp_path / 'checkpoints' / '2'
  deadline = time.time() + 500
  while not checkpoint.is_dir() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  stopped = re.search(r'Interrupted: stopped after iteration (\d+) of 500 and saved checkpoint step \1 in .*checkpoints: '
                      r'run the same command again to resume from it\.', stderr)
  assert stopped, stderr[-3000:]
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
  assert (tmp_path / 'checkpoints' / stopped.group(1)).is_dir()  # no iteration lost


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(model, tmp_path):
  config = _config(model, tmp_path, learning_rate=1e30, checkpoint_every=1, iterations=5)
  with pytest.raises(RunError, match=r'Iteration 2: the loss is (nan|inf)\. .*last good checkpoint is step 1.*'
                     'Lower train.learning_rate'):
    run_erasure(config, progress=False)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1']


def test_resume_with_a_new_learning_rate(model, tmp_path):
  # What the non-finite message advises: the same command with another learning rate goes on from the last
  # checkpoint, Adam's state carried over, the change logged. A torn last metrics line (what a full disk or a kill
  # leaves) is dropped, not fatal.
  config = _config(model, tmp_path, learning_rate=1e-4, checkpoint_every=1, iterations=2)
  run_erasure(config, progress=False)
  metrics = tmp_path / 'metrics.jsonl'
  metrics.write_text(metrics.read_text() + '{"step": 3, "lo')
  config.train.update(learning_rate=5e-5, iterations=4)
  result = run_erasure(config, progress=False)
  change = {'step': 2, 'learning_rate': {'was': 1e-4, 'now': 5e-5}}
  assert result.metadata['learning_rate_changes'] == [change]
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r.get('step') for r in records] == [1, 2, 2, 3, 4]
  assert records[2] == {'event': 'learning_rate_changed', **change}
  # Anything else that differs is still another run.
  config.train.seed = 1
  with pytest.raises(RunError, match=r"holds checkpoints of a different run \(seed: checkpoint 0, now 1\)"):
    run_erasure(config, progress=False)


def test_one_run_per_workdir(model, tmp_path):
  with lock_workdir(tmp_path, 'erase'):
    with pytest.raises(RunError, match=f'{tmp_path} is in use by process {os.getpid()} on .*`erase`'):
      run_erasure(_config(model, tmp_path), progress=False)
  with lock_workdir(tmp_path, 'erase'):  # released when the first run ends
    pass


def test_bad_input(model, tmp_path):
  config = _config(model, tmp_path)
  config.erase.concepts = ('  ',)
  with pytest.raises(RunError, match='every concept must be a non-empty prompt'):
    run_erasure(config, progress=False)
  (tmp_path / 'file').write_text('')
  config = _config(model, tmp_path / 'file' / 'run')
  with pytest.raises(RunError, match='is not writable'):
    run_erasure(config, progress=False)
  config = _config(model, tmp_path / 'run')
  config.erase.method = 'esd-q'
  with pytest.raises(ValueError, match="Unknown train method 'esd-q'. Valid methods"):
    run_erasure(config, progress=False)
  config.erase.method, config.erase.patterns = 'patterns', ('nothing_matches',)
  with pytest.raises(ValueError, match='selects no UNet parameter'):
    run_erasure(config, progress=False)


def test_a_full_disk_while_checkpointing_is_one_message(tmp_path, monkeypatch):
  # What orbax raises when the disk fills (seen on a full tmpfs); the background save's error surfaces at the next
  # save or at the end. Any other error passes through as it is.
  def failing(message):
    def save(*args, **kwargs):
      raise ValueError(message)
    return save
  checkpoints = Checkpoints(tmp_path / 'checkpoints', keep=1)
  monkeypatch.setattr(checkpoints._manager, 'save', failing(
      'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database: Failed to write 3463558 bytes to file 4: No space '
      "left on device [os_error_code='28']"))
  with pytest.raises(RunError, match=r'Writing checkpoints to .*checkpoints failed: the disk is full\. Free space '
                                     r'there, or use another --config.workdir.*resumes from the last complete'):
    checkpoints.save(1, {'w': np.zeros(3, np.float32)}, {}, {})
  monkeypatch.setattr(checkpoints._manager, 'save', failing('shapes differ'))
  with pytest.raises(ValueError, match='shapes differ'):
    checkpoints.save(1, {'w': np.zeros(3, np.float32)}, {}, {})
  checkpoints.close()


def test_frozen_base_in_bfloat16(model, tmp_path):
  # bfloat16 compute holds the frozen base in bfloat16 (frozen_dtype auto) and trains exactly as with a float32 base
  # (each layer rounds its weights to bfloat16 either way); the trained subset starts from the float32 originals (the
  # run's fingerprint of them is the float32 one), and the export's other tensors are the float32 base, bit for bit.
  from convert.erased import write_erased
  from esd_jax.loading import load_pipeline
  from esd_jax.methods import trained_keys
  from esd_jax.models.state_dict import split_flat, state_dict
  from esd_jax.train import _fingerprint
  run = run_erasure(_config(model, tmp_path / 'run', compute_dtype='bfloat16', iterations=2), progress=False)
  float32_base = run_erasure(_config(model, tmp_path / 'f32', compute_dtype='bfloat16', frozen_dtype='float32',
                                     iterations=2), progress=False)
  assert all(np.array_equal(run.trained[k], float32_base.trained[k]) for k in run.trained)
  base_unet = load_pipeline(model).unet
  held = split_flat(base_unet)[1]
  assert run.metadata['frozen_dtype'] == 'bfloat16'
  assert run.metadata['base_weights'] == _fingerprint(held, trained_keys(held, 'esd-x'))
  base = state_dict(base_unet)
  moved = [k for k in run.trained if not np.array_equal(np.asarray(run.trained[k]), np.asarray(base[k]))]
  assert len(moved) == len(run.trained) == 20 and all(run.trained[k].dtype == np.float32 for k in run.trained)
  written = write_erased(run.pipe, run.trained, tmp_path / 'export', ['unet'])
  unet = load_file(next(Path(written['unet']).glob('*.safetensors')))
  untrained = [k for k in base if k not in run.trained]
  assert untrained and all(np.array_equal(unet[k], np.asarray(base[k])) for k in untrained)
  assert all(unet[k].dtype == np.float32 for k in unet)
