"""esd-jax command line.

    python main.py [COMMAND] [--config=configs/FILE.py] [--config.FIELD=VALUE ...]

COMMAND is one of the keys of COMMANDS below (default: erase, which on the default config erases "circle" from
the shipped shapes-world model and measures it). Each command reads its section of an
ml_collections config (`configs/*.py`, a `get_config()` per file); any field can be overridden on the
command line, and a field that does not exist is an error.
"""

from __future__ import annotations

import os

from absl import app, logging
from ml_collections import config_flags

from esd_jax import commands

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Experiment config file (get_config()).')

COMMANDS = {
    'erase': commands.erase,
    'generate': commands.generate,
    'evaluate': commands.evaluate,
    'train_world': commands.train_world,
    'dry_run': commands.dry_run,
    'export': commands.export,
    'compare': commands.compare,
}


def main(argv):
  if len(argv) > 2:
    raise app.UsageError(f'Expected at most one command, got {argv[1:]}.')
  command = argv[1] if len(argv) > 1 else 'erase'
  if command not in COMMANDS:
    raise app.UsageError(f'Unknown command {command!r}; choose one of {sorted(COMMANDS)}.')
  logging.info('esd-jax %s with config:\n%s', command, _CONFIG.value)
  if 'mesh' in _CONFIG.value and _CONFIG.value.mesh.distributed:
    import jax
    jax.distributed.initialize()  # multi-host: every host runs this same command
  COMMANDS[command](_CONFIG.value)


if __name__ == '__main__':
  app.run(main)
