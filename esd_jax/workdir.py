"""One run per work directory: a lock that a second run on the same workdir is refused by, naming the first."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from esd_jax.errors import RunError

LOCK_NAME = '.lock'


def ensure_writable(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write-test-{os.getpid()}'  # per process: several may share the workdir
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise RunError(f'Work directory {workdir} is not writable ({e}); choose another --config.workdir.') from e


@contextlib.contextmanager
def lock_workdir(workdir: Path, command: str) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` while the block runs.

  The lock is the operating system's (flock): it goes with the process, so a run killed by SIGKILL leaves no
  stale lock behind, and the lock file only says who holds it.
  """
  ensure_writable(workdir)
  handle = open(workdir / LOCK_NAME, 'a+')
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or 'another process'
    handle.close()
    raise RunError(f'{workdir} is in use by {holder}. Two runs in one workdir would mix their checkpoints and '
                   'metrics: wait for that run to finish (or stop it), or use another --config.workdir.') from None
  handle.seek(0)
  handle.truncate()
  handle.write(f'process {os.getpid()} on {socket.gethostname()} (`{command}`, since '
               f'{time.strftime("%Y-%m-%d %H:%M:%S")})\n')
  handle.flush()
  try:
    yield
  finally:
    handle.truncate(0)
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
