"""A run's Orbax checkpoints: the train state, the run's metadata, and which models stopped.

A checkpoint is resumed only by the run that wrote it: the metadata must agree, except the learning rates
(RESUMABLE), which a run may change on resume, e.g. to go on after a non-finite loss from its last good
checkpoint with a lower rate. Adam's moments carry over; the change is logged, kept in the metadata
(`learning_rate_changes`) and written to the metrics.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from esd_jax.errors import RunError
from esd_jax.files import is_disk_full
from esd_jax.log import log

RESUMABLE = ('learning_rate', 'concept_learning_rate', 'learning_rate_changes')


class Restored(NamedTuple):
  state: Any
  failed: dict[int, str]
  step: int
  metadata: dict[str, Any]
  change: dict[str, Any] | None  # the learning-rate change made at this resume, if any


class Checkpoints:
  """workdir/checkpoints, written asynchronously; the newest `keep` are kept."""

  def __init__(self, directory: Path, *, keep: int):
    self.directory = directory.resolve()
    with self._writing('opening'):
      self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=True))

  @contextlib.contextmanager
  def _writing(self, what: str):
    """Turns a full disk (orbax reports RESOURCE_EXHAUSTED through several layers) into one clear message."""
    try:
      yield
    except Exception as e:
      if not is_disk_full(e):
        raise
      raise RunError(f'{what.capitalize()} {self.directory} failed: the disk is full. Free space there, or use '
                     'another --config.workdir (copy the checkpoints along to keep the progress); re-running the same '
                     'command resumes from the last complete checkpoint.') from None

  def restore(self, initial_state, state_sharding, metadata: dict[str, Any]) -> Restored:
    """The newest checkpoint's state, stopped models and step (the initial state at step 0 without one)."""
    step = self._manager.latest_step() or 0
    if not step:
      return Restored(initial_state, {}, 0, metadata, None)
    saved = self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore(),
                                                               failed=ocp.args.JsonRestore()))
    run = saved['run']
    differ = {k: (run.get(k), v) for k, v in metadata.items() if k not in RESUMABLE and run.get(k) != v}
    if differ:
      lines = '; '.join(f'{k}: checkpoint {a!r}, now {b!r}' for k, (a, b) in sorted(differ.items()))
      raise RunError(f'{self.directory} holds checkpoints of a different run ({lines}). Resuming would mix two '
                     'erasures: use another --config.workdir, or delete the checkpoints to start over.')
    changes = list(run.get('learning_rate_changes', []))
    changed = {k: {'was': run.get(k), 'now': metadata[k]} for k in ('learning_rate', 'concept_learning_rate')
               if run.get(k) != metadata[k]}
    change = {'step': step, **changed} if changed else None
    if change:
      changes.append(change)
      log.warning('Resuming from step %d with a new learning rate (%s); Adam\'s moments carry over.', step,
                  ', '.join(f'{k} {v["was"]} → {v["now"]}' for k, v in changed.items()))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), initial_state,
                          state_sharding)
    state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    log.info('Resumed from step %d of %s', step, self.directory)
    return Restored(state, {int(k): v for k, v in saved['failed'].items()}, step,
                    {**metadata, 'learning_rate_changes': changes} if changes else metadata, change)

  def save(self, step: int, state, metadata: dict[str, Any], failed: dict[int, str]) -> None:
    with self._writing('writing checkpoints to'):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(metadata),
          failed=ocp.args.JsonSave({str(k): v for k, v in failed.items()})), force=True)

  def wait(self) -> None:
    with self._writing('writing a checkpoint to'):
      self._manager.wait_until_finished()

  def last_complete(self) -> int | None:
    """The newest checkpoint on disk, after any save in flight has finished."""
    self.wait()
    return self._manager.latest_step()

  def close(self) -> None:
    with self._writing('finishing the checkpoints in'):
      self._manager.wait_until_finished()
      self._manager.close()
