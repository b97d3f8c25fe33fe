"""Several hosts, proved with local processes (tests/multihost.py): 2 processes × 2 CPU devices run `erase` as one
process with 4 devices does, on the same mesh shape, and process 0 alone writes, logs and prints."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.multihost import check_all_succeeded, launch, main_py, start

pytestmark = pytest.mark.multihost


def _erase(model, workdir, *settings, method='esd-x'):
  return ['erase', f'--config.model={model}', f'--config.workdir={workdir}', f'--config.erase.method={method}',
          '--config.erase.ddim_steps=4', '--config.train.iterations=4', '--config.train.checkpoint_every=2',
          '--config.train.learning_rate=1e-4', '--config.mesh.min_shard_size=2048', '--config.evaluate.classifier=',
          "--config.export.formats=('trained', 'single_file')", *settings]


_FSDP_ACROSS_BOTH = ('--config.mesh.data=1', '--config.mesh.fsdp=4')


def _check_equal_and_process_0_alone_wrote(tmp_path, one: str, two: str, results, trained_tensors: int,
                                           iterations: int = 4):
  """The erasure of tmp_path/two (two processes: `results`) equals tmp_path/one's (one process), and process 0 alone
  printed and wrote."""
  one, two = tmp_path / one, tmp_path / two
  a, b = (load_file(run / 'erased' / 'unet_trained.safetensors') for run in (one, two))
  assert len(a) == trained_tensors and a.keys() == b.keys()
  # Not bit for bit: gloo's all-gathers and reduce-scatters sum in another order than one process does (ESD-x:
  # 3.8e-8 relative after 4 iterations, ESD-u up to 1.1e-6, losses equal to 1e-6; the draws are the same).
  assert _relative_difference(a, b) <= 1e-5
  single = [load_file(run / 'erased' / 'model.safetensors') for run in (one, two)]
  assert single[0].keys() == single[1].keys()
  assert _relative_difference(*single) <= 1e-5
  same = [k for k in single[0] if np.array_equal(single[0][k], single[1][k])]
  assert len(same) >= len(single[0]) - trained_tensors  # everything but the trained tensors, bit for bit
  (_, out0, err0), (_, out1, err1) = results
  assert 'Erased model (trained)' in out0 and not _own(out1)
  assert 'erase:' in err0 and 'erase:' not in err1  # the progress bar
  steps = [json.loads(line)['step'] for line in (two / 'metrics.jsonl').read_text().splitlines()]
  assert steps == list(range(1, iterations + 1))
  assert sorted(p.name for p in (two / 'erased').iterdir()) == ['model.safetensors', 'unet_trained.safetensors']


_TWO_CONCEPTS_PER_STEP = ("--config.erase.concepts=('a cat', 'a dog')", '--config.train.concepts_per_step=2')


def test_esd_u_across_two_processes_one_lost_then_resumed_equals_one_process(model, tmp_path):
  # ESD-u, two concepts a step: every tensor of the UNet's non-cross-attention layers trained, fsdp over both
  # processes' four devices, so the large tensors are split between them (ESD-x across processes: test_separate_
  # models_one_per_process_equal_one_process). Process 1 is killed (SIGKILL) after a checkpoint: process 0 must stop
  # on its own, soon, leaving nothing half-written; relaunched, the run resumes from its last complete checkpoint and
  # ends where one process with four devices ends (a resume in one process is bit for bit the uninterrupted run:
  # tests/test_train.py).
  args = lambda workdir: _erase(model, workdir, *_FSDP_ACROSS_BOTH, *_TWO_CONCEPTS_PER_STEP, '--config.train.iterations=8',
                                '--config.mesh.heartbeat_timeout_s=15', method='esd-u')
  main_py(args(tmp_path / 'one'), devices=4, cwd=tmp_path)
  run = tmp_path / 'run'
  checkpoints = run / 'checkpoints'
  procs = start(args(run), processes=2, devices=2, cwd=tmp_path, stdout=subprocess.DEVNULL)
  try:
    deadline = time.time() + 400
    while (not any(p.name.isdigit() for p in checkpoints.glob('*')) and time.time() < deadline
           and procs[0].poll() is None):
      time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)
    lost = time.time()
    _, stderr = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0, 'the run ended before process 1 was killed'
    assert time.time() - lost < 60, 'the surviving process took too long to stop'
    # Either the failed collective surfaces first (esd-jax's message), or JAX's coordination service, which lives in
    # process 0, finds process 1 silent for mesh.heartbeat_timeout_s and ends process 0 with its own fatal error
    # (which of the two comes first depends on timing; under load both were seen).
    lines = '\n'.join(line for line in stderr.splitlines() if 'erase:' not in line)
    assert ('a collective across the 2 processes failed' in stderr
            or 'the JAX distributed service detected fatal errors' in stderr), lines[:3000]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  # Nothing half-written looks complete: no export, and every checkpoint under its final name is finished (orbax
  # writes under a temporary name and renames when all processes are done).
  assert not (run / 'erased').exists() and len((run / 'metrics.jsonl').read_text().splitlines()) < 8
  final = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert final and all((checkpoints / str(step) / '_CHECKPOINT_METADATA').is_file() for step in final)
  results = launch(args(run), processes=2, devices=2, cwd=tmp_path)
  check_all_succeeded(results)
  assert f'esd-jax: Resumed from step {final[-1]}' in results[0][2]
  _check_equal_and_process_0_alone_wrote(tmp_path, 'one', 'run', results, trained_tensors=180, iterations=8)


def test_every_other_command_on_two_processes_equals_one_process(model, tmp_path):
  # One invocation runs the commands in turn on ESD weights in the authors' 2025 format (only the trained tensors):
  # the tiny UNet's cross-attention keys and values, scaled. Every output file of the two-process run is
  # byte-identical to the one-process run's (each process samples on its own devices), written by process 0 alone.
  base = load_file(model / 'unet' / 'diffusion_pytorch_model.safetensors')
  save_file({k: v * 1.5 for k, v in base.items() if '.attn2.to_k.' in k or '.attn2.to_v.' in k},
            tmp_path / 'esd.safetensors')
  args = lambda workdir: [
      'dry_run', 'export', 'generate', 'compare', 'evaluate', f'--config.model={model}',
      f'--config.workdir={workdir}', f'--config.export.weights={tmp_path / "esd.safetensors"}',
      "--config.export.formats=('diffusers', 'trained', 'single_file')", "--config.generate.prompts=('a cat', 'a dog')",
      '--config.generate.seeds=(0, 1)', '--config.generate.steps=3', "--config.evaluate.prompts=('a red circle',)",
      '--config.evaluate.seeds=2', '--config.evaluate.steps=3', '--config.evaluate.grid_seeds=2',
      '--config.mesh.data=1', '--config.mesh.fsdp=4']
  one = main_py(args(tmp_path / 'one'), devices=4, cwd=tmp_path)
  results = launch(args(tmp_path / 'two'), processes=2, devices=2, cwd=tmp_path)
  check_all_succeeded(results)
  files = lambda run: sorted(str(p.relative_to(tmp_path / run)) for p in (tmp_path / run).rglob('*') if p.is_file())
  assert files('one') == files('two') and len(files('one')) > 10, files('two')
  for name in files('one'):
    if name == 'evaluate_jax.json':  # its wall time differs
      reports = [json.loads((tmp_path / run / name).read_text()) for run in ('one', 'two')]
      assert reports[0]['per_prompt'] == reports[1]['per_prompt']
    else:
      assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes(), name
  (_, out0, _), (_, out1, err1) = results
  assert _own(out0.replace(str(tmp_path / 'two'), '')) == _own(one.stdout.replace(str(tmp_path / 'one'), ''))
  assert not _own(out1) and not [line for line in err1.splitlines() if 'esd-jax' in line]


def _own(text: str) -> list[str]:
  # Without gloo's C++ chatter ("[Gloo] Rank 1 is connected to 3 peer ranks…"), whose lines two threads may split.
  return [line for line in text.splitlines() if 'peer ranks' not in line and line.strip() != '[Gloo] Rank']


def _relative_difference(a: dict, b: dict) -> float:
  flat = lambda d: np.concatenate([np.ravel(d[k]).astype(np.float64) for k in sorted(d)])
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(a)))


def test_separate_models_one_per_process_equal_one_process(model, tmp_path):
  # Two concepts, mesh.concept=2: each process holds one model (tests/test_batch.py checks that each model of a batch
  # equals its concept trained alone); the manifest is written once.
  mesh = ('--config.erase.separate_models=True', "--config.erase.concepts=('a cat', 'a dog')",
          '--config.mesh.concept=2', '--config.mesh.data=1', '--config.mesh.fsdp=2', "--config.export.formats=('trained',)")
  main_py(_erase(model, tmp_path / 'one', *mesh), devices=4, cwd=tmp_path)
  check_all_succeeded(launch(_erase(model, tmp_path / 'two', *mesh), processes=2, devices=2, cwd=tmp_path))
  for name in ('000-a_cat', '001-a_dog'):
    a, b = (load_file(tmp_path / run / 'erased' / name / 'unet_trained.safetensors') for run in ('one', 'two'))
    assert a.keys() == b.keys() and _relative_difference(a, b) <= 1e-6
  manifests = [json.loads((tmp_path / run / 'erased' / 'manifest.json').read_text()) for run in ('one', 'two')]
  assert [m['status'] for m in manifests[1]['models']] == ['done', 'done']
  assert [m['prompt'] for m in manifests[0]['models']] == [m['prompt'] for m in manifests[1]['models']]
