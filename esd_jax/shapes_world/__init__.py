"""The shapes world: esd-jax's built-in demo model, the data it was trained on, and the judge that measures it.

world.py draws and captions the images, trainer.py trains the pipeline (with fit.py), classifier.py is the
judge, measure.py measures what a pipeline draws and what an erasure changed, probe.py is erase-until's probe.
The ESD core never imports it.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / 'assets'
PIPELINE = ASSETS / 'shapes_world'  # the shipped text-to-image pipeline (a diffusers folder)
CLASSIFIER = ASSETS / 'shapes_classifier'  # its judge (classifier.save_classifier folder)
