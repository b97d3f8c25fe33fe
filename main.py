"""esd-jax command line.

    python main.py [COMMAND ...] [--config=configs/FILE.py] [--config.FIELD=VALUE ...] [--verbosity=0|1]

COMMAND is one of esd_jax.commands.COMMANDS (default: erase, which on the default config erases "circle" from
the shipped shapes-world model and measures it); several run one after the other on the same config (`erase
compare`), each checked before the first starts, so a pod pays its start-up once. `serve` (alone) runs the web
app, esd_jax/app, until Ctrl-C. Each command reads its section of an ml_collections config
(`configs/*.py`, a `get_config()` per file); any field can be overridden on the command line, and a field that
does not exist is an error.

The console shows esd-jax's own lines, progress bars and results; `--verbosity=0` (absl) adds the libraries'
INFO logs (orbax, jax), `--verbosity=1` their debug logs too. An error the user can fix (a bad config, a missing
file, a run that cannot resume) prints as one message; `--verbosity` ≥ 0 or ESD_JAX_TRACEBACK=1 shows its
traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from esd_jax import commands, distributed, validate
from esd_jax.errors import USER_ERRORS, user_message
from esd_jax.files import is_disk_full, says_disk_full
from esd_jax.log import log

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Experiment config file (get_config()).')


def _show_esd_jax_logs(*, main: bool) -> None:
  """esd-jax's INFO lines on process 0; the other processes of a multi-process run say only what fails."""
  handler = std_logging.StreamHandler(sys.stderr)
  handler.setFormatter(std_logging.Formatter('%(levelname)s esd-jax: %(message)s'))
  log.addHandler(handler)
  log.setLevel(std_logging.INFO if main else std_logging.ERROR)
  log.propagate = False  # absl's handler on the root logger would print each line again


class _DiskFullTracebacks(std_logging.Filter):
  """Drops orbax's logged tracebacks of a full disk (five for one failed save): esd-jax reports it once, with the
  path and the fix."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (says_disk_full(record.getMessage()) or (record.exc_info and is_disk_full(record.exc_info[1])))


def main(argv):
  names = argv[1:] or ['erase']
  known = [*commands.COMMANDS, 'serve']  # serve, the web app, sits above the commands it runs
  unknown = [name for name in names if name not in known]
  if unknown:
    raise app.UsageError(f'Unknown command {unknown[0]!r}; choose from {sorted(known)}.')
  if 'serve' in names and names != ['serve']:
    raise app.UsageError('`serve` runs the web app until it is stopped (Ctrl-C): run it alone.')
  command = ' '.join(names)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # app.run raised it to INFO: the libraries' INFO logs only on request
  config = _CONFIG.value
  tracebacks = logging.get_verbosity() >= logging.INFO or os.environ.get('ESD_JAX_TRACEBACK') == '1'
  if not tracebacks:
    logging.get_absl_logger().addFilter(_DiskFullTracebacks())
  if 'plan' in names and 'plan' in config and config.plan.devices:
    if names != ['plan']:
      raise app.UsageError('--config.plan.devices emulates CPU devices for `plan`: run `plan` alone with it.')
    jax.config.update('jax_platforms', 'cpu')  # before anything starts a backend
    jax.config.update('jax_num_cpu_devices', config.plan.devices)
  try:
    if names == ['serve']:
      validate.check(config, 'serve')  # first: it refuses the multi-process set-up below
    if 'mesh' in config and config.mesh.distributed:
      distributed.initialize(config.mesh)  # every process runs this same command
    _show_esd_jax_logs(main=distributed.is_main())
    logging.info('esd-jax %s with config:\n%s', command, config)
    if names == ['serve']:
      from esd_jax.app import server  # gradio is imported for `serve` alone
      server.serve(config)
    else:
      commands.run(names, config)
  except KeyboardInterrupt:
    if tracebacks:
      raise
    print(f'esd-jax {command}: interrupted. Finished outputs are complete (each is written under a temporary name '
          'and renamed when done); run the command again to redo the rest.', file=sys.stderr)
    sys.exit(130)
  except USER_ERRORS as e:
    if tracebacks:
      raise
    print(f'esd-jax {command}: {user_message(e)}', file=sys.stderr)
    print('(--verbosity=0 or ESD_JAX_TRACEBACK=1 shows where it was raised.)', file=sys.stderr)
    sys.exit(getattr(e, 'exit_code', 1))


if __name__ == '__main__':
  app.run(main)
