"""Local processes standing for the hosts of a pod: `main.py` started N times on 127.0.0.1 (jax.distributed, gloo
collectives on CPU), each with its own emulated CPU devices, under one deadline; if one fails or time runs out all
are killed, and the error shows every process's log."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# The subprocesses the tests start run a few short iterations of the tiny model: compiling is most of their time.
# LLVM at -O0 compiles the tiny ESD-u step in 28 s instead of 38 and runs it 4× slower (0.55 s an iteration instead of
# 0.12); the two-process kill-and-resume test takes 183 s instead of 242 alone. XLA's HLO passes are the same at every
# level, but LLVM's may round a fused multiply-add differently: a test that compares a subprocess's numbers with
# in-process ones does so within a tolerance (as it must anyway for sharded sums).
XLA_FLAGS = '--xla_backend_optimization_level=0'


def env(devices: int) -> dict:
  """A subprocess's environment: `devices` emulated CPU devices, compiled for compile time (XLA_FLAGS)."""
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices} {XLA_FLAGS}',
          'JAX_PLATFORMS': 'cpu'}


def main_py(args, *, devices: int, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
  """One process with `devices` devices: the reference a multi-process run is compared with."""
  result = subprocess.run([sys.executable, str(ROOT / 'main.py'), *args], env=env(devices), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def process_flags(i: int, processes: int, port: int) -> list[str]:
  """main.py's flags that make it process i of `processes` with its coordinator on 127.0.0.1:port."""
  return ['--config.mesh.distributed=True', f'--config.mesh.coordinator_address=127.0.0.1:{port}',
          f'--config.mesh.num_processes={processes}', f'--config.mesh.process_id={i}']


def start(args, *, processes: int, devices: int, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
          ) -> list[subprocess.Popen]:
  """Starts `main.py args` as `processes` processes of one run (each in its own session, so killpg ends it)."""
  port = free_port()
  return [subprocess.Popen([sys.executable, str(ROOT / 'main.py'), *args, *process_flags(i, processes, port)],
                           env=env(devices), cwd=cwd, stdout=stdout, stderr=stderr, text=True,
                           start_new_session=True) for i in range(processes)]


def launch(args, *, processes: int, devices: int, cwd, timeout: float = 600) -> list[tuple[int, str, str]]:
  """Runs `main.py args` as `processes` processes of one run; returns (exit code, stdout, stderr) of each."""
  procs = start(args, processes=processes, devices=devices, cwd=cwd)
  deadline = time.time() + timeout
  try:
    logs = [p.communicate(timeout=max(1, deadline - time.time())) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, logs)]
  except subprocess.TimeoutExpired:
    for p in procs:
      os.killpg(p.pid, signal.SIGKILL)
    logs = [p.communicate() for p in procs]
    raise AssertionError(f'{processes} processes still running after {timeout} s:\n' + '\n'.join(
        f'--- process {i} ---\n{err[-3000:]}' for i, (_, err) in enumerate(logs))) from None
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)


def check_all_succeeded(results) -> None:
  failed = [i for i, (code, _, _) in enumerate(results) if code != 0]
  assert not failed, '\n'.join(f'--- process {i} (exit {code}) ---\n{err[-3000:]}'
                               for i, (code, _, err) in enumerate(results))
