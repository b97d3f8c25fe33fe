"""The server's training: one at a time, in a thread of its own, followed by every page that polls it.

A run is `commands.erase` on its config, exactly as the command line runs it, with two hooks of
train.run_erasure: `on_iteration` feeds the progress every page shows (iteration, loss, it/s), and `stop` asks
the loop to stop after the iteration in progress, as Ctrl-C does: it saves a checkpoint, and the run ends with the
"Interrupted" RunError, which here means "stopped". Resume is the same config started again: erase resumes from
the checkpoint (and refuses one of another run). A second Start while a run goes on is answered with what is
running, not started; the workdir lock of each run is still there beneath this, as for two command lines.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import ml_collections
import numpy as np

from esd_jax import commands
from esd_jax.errors import USER_ERRORS, RunError, user_message
from esd_jax.log import log

RUNNING = ('starting', 'training', 'finishing')


@dataclasses.dataclass(frozen=True)
class Progress:
  """What every page shows about the server's training."""

  state: str = 'idle'  # idle | starting | training | finishing | finished | stopped | failed
  run: str = ''  # the run's folder name
  what: str = ''  # "'circle' with esd-u"
  step: int = 0
  total: int = 0
  first_step: int = 0  # the step this start began at (a resumed run: its checkpoint's)
  loss: float | None = None
  rate: float | None = None  # iterations per second since the first iteration of this start (compiling excluded)
  message: str = ''
  stopping: bool = False

  @property
  def running(self) -> bool:
    return self.state in RUNNING


class Busy(RunError):
  """Start was pressed while a training runs: the page says what runs, as news rather than as an error."""


class Trainer:
  """Starts, follows and stops the server's one training."""

  def __init__(self):
    self._lock = threading.Lock()
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._progress = Progress()
    self._first: tuple[int, float] | None = None  # (step, time) of this start's first iteration
    self._measuring = False  # the run measures its model with the classifier after training

  def progress(self) -> Progress:
    with self._lock:
      return self._progress

  def _update(self, **changes) -> None:
    with self._lock:
      self._progress = dataclasses.replace(self._progress, **changes)

  def start(self, config: ml_collections.ConfigDict, run: Path) -> Progress:
    """Starts `config` (checked already) in its workdir `run`; a RunError says what runs when one does."""
    with self._lock:
      if self._progress.running:
        p = self._progress
        where = f'iteration {p.step} of {p.total}' if p.step else 'starting'
        raise Busy(f'A training is running on this server: {p.what} ({p.run}, {where}). One runs at a time: '
                       'wait for it to finish, or stop it first.')
      concepts = ', '.join(repr(c) for c in config.erase.concepts)
      self._stop = threading.Event()
      self._first = None
      self._progress = Progress(state='starting', run=run.name, what=f'{concepts} with {config.erase.method}',
                                total=int(config.train.iterations),
                                message='Loading the model and compiling the training step…')
      self._thread = threading.Thread(target=self._run, args=(config,), name=f'esd-jax erase {run.name}',
                                      daemon=True)
      self._thread.start()
      return self._progress

  def stop(self) -> Progress:
    """Asks the running training to stop after its current iteration, with a checkpoint."""
    with self._lock:
      if self._progress.state in ('starting', 'training'):
        self._stop.set()
        self._progress = dataclasses.replace(
            self._progress, stopping=True,
            message='Stopping after this iteration; its checkpoint is kept (Resume continues the run).')
      elif self._progress.state == 'finishing':
        self._progress = dataclasses.replace(
            self._progress, message='The training is done; writing the erased model cannot be stopped halfway.')
      return self._progress

  def join(self, timeout: float | None = None) -> None:
    thread = self._thread
    if thread is not None:
      thread.join(timeout)

  def _on_iteration(self, record: dict) -> None:
    now, step = time.perf_counter(), int(record['step'])
    if self._first is None:
      self._first = (step, now)
    first_step, first_time = self._first
    rate = (step - first_step) / (now - first_time) if step > first_step else None
    losses = np.asarray(record['loss'], np.float64).reshape(-1)  # separate models: one loss each
    finite = losses[np.isfinite(losses)]
    done = step >= record['total']
    self._update(state='finishing' if done else 'training', step=step, total=int(record['total']),
                 first_step=first_step - 1, rate=rate, loss=float(finite.mean()) if finite.size else None,
                 message=('Writing the erased model' + (' and measuring it' if self._measuring else '') + '…')
                 if done else self._progress.message if self._progress.stopping else '')

  def _run(self, config: ml_collections.ConfigDict) -> None:
    self._measuring = bool(config.evaluate.classifier)
    start = time.perf_counter()
    try:
      commands.erase(config, progress=False, stop=self._stop, on_iteration=self._on_iteration)
    except RunError as e:
      if e.exit_code == 130:  # stopped by the Stop button: the checkpoint of its last iteration is kept
        p = self.progress()
        self._update(state='stopped', stopping=False,
                     message=f'Stopped after iteration {p.step} of {p.total}; checkpoint step {p.step} is kept. '
                             'Resume continues the run from it.')
      else:
        self._update(state='failed', stopping=False, message=user_message(e))
    except USER_ERRORS as e:
      self._update(state='failed', stopping=False, message=user_message(e))
    except Exception as e:  # a bug: the page gets one line, the server log the traceback; the server goes on
      log.exception('The training %s failed', self.progress().run)
      self._update(state='failed', stopping=False, message=unexpected(e))
    else:
      self._update(state='finished', stopping=False, step=self.progress().total,
                   message=f'Finished in {time.perf_counter() - start:.0f} s: the erased model is in the Test and '
                           'Models tabs.')


def unexpected(error: BaseException) -> str:
  """One line for an error that is not the user's (a bug): its type and first line, and where the rest is."""
  first = (str(error).strip().splitlines() or [''])[0][:300]
  return f'Unexpected error ({type(error).__name__}: {first}). The server log has the details; the server goes on.'
