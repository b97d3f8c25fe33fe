"""Erase each of the four shapes from the shapes-world model: four separate erased models, trained together in
one batched run over one shared frozen base (erase.separate_models), each measured against the original.

    python main.py erase --config=configs/shapes_four_models.py

Model s erases shape s from each of the prompts "a {colour} {shape}" with ESD-x: shapes_four_models.csv has
four lines per shape (one drawn per iteration), each shape's η, and the circle's own learning rate and
iteration count (2e-4 for 150; the others take the run's 1e-4 for 300): ESD-x moves circles slowly, and at
the others' pace it leaves half of them. ESD-u on the bare word, the default job's recipe, erases circles and
triangles but takes circles with squares and crosses (README, batch erasure).
"""

from pathlib import Path

from configs import default


def get_config():
  config = default.get_config()
  config.workdir = 'outputs/shapes-four-models'
  config.erase.concepts_file = str(Path(__file__).with_name('shapes_four_models.csv'))
  config.erase.separate_models = True
  config.erase.method = 'esd-x'
  config.train.learning_rate = 1e-4
  config.train.iterations = 300
  config.evaluate.grid_seeds = 2
  return config
