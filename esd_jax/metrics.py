"""workdir/metrics.jsonl: one JSON line per iteration (and per event, e.g. a learning-rate change on resume)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from esd_jax.errors import RunError
from esd_jax.files import atomic_path, is_disk_full
from esd_jax.log import log


class MetricsLog:
  """Appends records to a JSON-lines file; `open(resume_step)` first keeps only the lines a resumed run has
  already made (up to resume_step), rewritten atomically (by process 0 alone: `enabled`). A line that is not complete JSON (the torn last line a
  full disk or a kill leaves) is dropped with a warning."""

  def __init__(self, path: Path, *, enabled: bool = True):
    self.path = path
    self.enabled = enabled  # False on every process but process 0 of a multi-process run
    self._file = None

  def open(self, resume_step: int) -> None:
    if not self.enabled:
      return
    kept = []
    if self.path.exists():
      for n, line in enumerate(self.path.read_text(encoding='utf-8', errors='replace').splitlines(), 1):
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          log.warning('%s line %d is not a complete record (a write cut short?): dropped.', self.path, n)
          continue
        if isinstance(record, dict) and record.get('step', 0) <= resume_step:
          kept.append(line)
    try:
      with atomic_path(self.path) as tmp:
        tmp.write_text(''.join(line + '\n' for line in kept), encoding='utf-8')
      self._file = open(self.path, 'a', buffering=1, encoding='utf-8')
    except OSError as e:
      raise self._error(e) from e

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    try:
      self._file.write(json.dumps(record) + '\n')
    except OSError as e:
      raise self._error(e) from e

  def _error(self, e: OSError) -> RunError:
    fix = ('the disk is full: free space there, or use another --config.workdir' if is_disk_full(e) else
           f'{e.strerror or e}')
    return RunError(f'Writing {self.path} failed: {fix}. Re-running the same command resumes from the last '
                    'checkpoint.')

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
