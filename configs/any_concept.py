"""One command for any concept of the shapes world (issue 14): ESD-u with the retain loss on the world's other
prompts and erase-until, the concept the only thing a user changes:

    python main.py --config=configs/any_concept.py --config.erase.concepts="('square',)"

The candidate under measurement, not yet the answer: README "Erasing any concept" has what each setting did, and
`python benchmarks/any_concept.py` runs it over the 8 concepts × 3 seeds. The run stops as soon as its probe sees the
concept gone with nothing else lost, at most train.iterations, and exports the best model it measured otherwise.
"""

from configs.default import get_config as default_config


def get_config():
  config = default_config()
  config.workdir = 'outputs/any-concept'
  config.erase.method = 'esd-u'
  config.erase.negative_guidance = 3.0
  config.train.learning_rate = 5e-5
  config.train.iterations = 600
  with config.ignore_type():  # a tuple of prompts by default; 'auto': the shapes world's prompts without the concept
    config.erase.preserve = 'auto'
  config.erase.preserve_weight = 3.0
  config.probe.every = 25
  config.evaluate.seeds = 64  # the measurement
  return config
