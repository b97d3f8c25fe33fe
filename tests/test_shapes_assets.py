"""The shipped shapes-world pipeline and classifier: present, loadable by us and by diffusers, consistent."""

import json

import numpy as np
import pytest

from esd_jax.loading import load_pipeline
from esd_jax.shapes_world import classifier
from esd_jax.shapes_world import CLASSIFIER, PIPELINE
from esd_jax.shapes_world.measure import Sampling, generate_diffusers, generate_jax, score
from esd_jax.shapes_world.trainer import UNET, VAE, Recipe


@pytest.fixture(scope='module')
def pipe():
  return load_pipeline(PIPELINE)


def test_shipped_pipeline_is_the_recipes_output(pipe):
  record = json.loads((PIPELINE / 'training.json').read_text())
  assert record['recipe'] == Recipe().__dict__  # trained by the committed script with its default recipe
  assert dict(pipe.unet.config)['block_out_channels'] == tuple(UNET['block_out_channels'])
  assert dict(pipe.vae.config)['scaling_factor'] == pytest.approx(record['scaling_factor'])
  assert dict(pipe.vae.config)['block_out_channels'] == tuple(VAE['block_out_channels'])
  size = sum(p.stat().st_size for p in PIPELINE.rglob('*') if p.is_file())
  assert size < 40 * 2**20  # a few MB: committed to the repository


def test_shipped_classifier_is_accurate_on_held_out_drawings():
  judge = classifier.load_classifier(CLASSIFIER)
  for augmented in (False, True):
    accuracy = classifier.held_out_accuracy(judge, 2000, augmented=augmented)
    assert accuracy['shape'] >= 0.99 and accuracy['colour'] >= 0.99, (augmented, accuracy)


@pytest.mark.parity
def test_diffusers_runs_the_shipped_pipeline_as_we_do(pipe):
  prompts, seeds, sampling = ['a red circle', 'a blue cross', 'square'], [0, 1], Sampling(steps=10)
  ours = generate_jax(pipe, prompts, seeds, sampling)
  theirs = generate_diffusers(PIPELINE, prompts, seeds, sampling, latent_shape=(8, 8, 4))
  assert ours.shape == theirs.shape == (3, 2, 64, 64, 3)
  assert np.abs(ours - theirs).max() <= 2 / 255
  judge = classifier.load_classifier(CLASSIFIER)
  assert score(judge, prompts, ours) == score(judge, prompts, theirs)
