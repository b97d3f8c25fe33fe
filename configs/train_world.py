"""Trains the shipped shapes-world model and its classifier: `python main.py train_world --config=configs/train_world.py`.

With these values (and the same backend) it reproduces esd_jax/shapes_world/assets/ exactly; see the README for the time it
takes. Each stage's fields are those of esd_jax.shapes_world.trainer.Recipe.
"""

import dataclasses

import ml_collections

from esd_jax.shapes_world.trainer import Recipe


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.output = 'esd_jax/shapes_world/assets'  # writes shapes_world/ (the pipeline) and shapes_classifier/ here
  config.world = ml_collections.ConfigDict(dataclasses.asdict(Recipe()))
  config.classifier = ml_collections.ConfigDict({'steps': 1500, 'seed': 0})
  return config
