"""Erase a colour from the shapes-world model with ESD-x (cross-attention only: the shapes stay).

    python main.py erase --config=configs/shapes_colour.py [--config.erase.concepts="('blue',)"]
"""

from configs import default


def get_config():
  config = default.get_config()
  config.workdir = 'outputs/shapes-colour'
  config.erase.concepts = ('red',)
  config.erase.method = 'esd-x'
  return config
