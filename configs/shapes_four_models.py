"""Erase each of the four shapes from the shapes-world model: four separate erased models, trained together in
one batched run over one shared frozen base (erase.separate_models), each measured against the original.

    python main.py erase --config=configs/shapes_four_models.py
"""

from configs import default
from esd_jax import shapes


def get_config():
  config = default.get_config()
  config.workdir = 'outputs/shapes-four-models'
  config.erase.concepts = shapes.SHAPES
  config.erase.separate_models = True
  config.evaluate.grid_seeds = 2
  return config
