"""Erase a colour from the shapes-world model with ESD-x (cross-attention only: the shapes stay).

    python main.py erase --config=configs/shapes_colour.py          # red
    python main.py erase --config=configs/shapes_colour.py:blue     # any colour of the world

The colour is erased from each "a {colour} {shape}" prompt (erase_from, docs/method.md §1): the student sees that
prompt and the anchor is the frozen model's answer to it, so the shape stays while the colour is guided away.
Erasing the bare word instead moved the other colours as much as the erased one (README, colour erasure).
"""

from configs import default
from esd_jax.shapes_world import world


def get_config(colour: str = 'red'):
  if colour not in world.COLOUR_NAMES:
    raise ValueError(f'configs/shapes_colour.py:{colour}: not a colour of the shapes world; choose one of '
                     f'{world.COLOUR_NAMES}.')
  config = default.get_config()
  config.workdir = f'outputs/shapes-colour-{colour}'
  config.erase.concepts = (colour,) * len(world.SHAPES)
  with config.ignore_type():  # one erase_from prompt per concept
    config.erase.erase_from = tuple(f'a {colour} {shape}' for shape in world.SHAPES)
  config.erase.method = 'esd-x'
  config.erase.negative_guidance = 1.0
  config.train.learning_rate = 1e-4
  config.train.iterations = 250
  return config
