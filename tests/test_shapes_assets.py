"""The shipped shapes-world pipeline and classifier: present, loadable by us and by diffusers, consistent."""

import json

import numpy as np
import pytest

from esd_jax.loading import load_pipeline
from esd_jax.shapes_world import classifier, world
from esd_jax.shapes_world import CLASSIFIER, PIPELINE
from esd_jax.shapes_world.measure import Sampling, generate_diffusers, generate_jax, overall, score
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


@pytest.fixture(scope='module')
def judge():
  return classifier.load_classifier(CLASSIFIER)


def test_shipped_classifier_is_accurate_on_held_out_drawings_and_rejects_none_of_them(judge):
  record = json.loads((CLASSIFIER / 'training.json').read_text())
  assert judge.config['reject']
  for condition in ('clean', 'degraded'):
    accuracy = classifier.held_out_accuracy(judge, 2000, augmented=condition == 'degraded')
    assert accuracy == pytest.approx(record['held_out_accuracy'][condition], abs=1e-3)  # the numbers recorded
    assert accuracy['shape'] >= 0.995 and accuracy['colour'] >= 0.995, (condition, accuracy)
    assert accuracy['rejected_shape'] <= 0.01 and accuracy['rejected_colour'] <= 0.01, (condition, accuracy)


def test_shipped_classifier_rejects_unrecognisable_images(judge):
  record = json.loads((CLASSIFIER / 'training.json').read_text())['held_out_unrecognisable']
  for condition in ('clean', 'degraded'):
    for kind, r in classifier.held_out_unrecognisable(judge, 500, augmented=condition == 'degraded').items():
      assert r == pytest.approx(record[condition][kind], abs=0.01), (condition, kind)  # the numbers recorded
      assert r['rejected'] >= 0.95, (condition, kind, r)
      assert r['kept'] is None or r['kept'] >= 0.99, (condition, kind, r)  # what is still clean is still named


def test_shipped_classifier_does_not_reject_the_base_models_generations(pipe, judge):
  # The README's numbers: 64 seeds per prompt (measure.record_base_model_check, in training.json).
  recorded = json.loads((CLASSIFIER / 'training.json').read_text())['base_model_generations']
  assert recorded['images_per_prompt'] == 64 and min(recorded['shape'], recorded['colour']) >= 0.98, recorded
  report = score(judge, world.PROMPTS, generate_jax(pipe, world.PROMPTS, range(8), Sampling()))
  numbers = overall(report)
  assert numbers['shape'] >= 0.98 and numbers['colour'] >= 0.98, report


@pytest.mark.parity
def test_diffusers_runs_the_shipped_pipeline_as_we_do(pipe, judge):
  prompts, seeds, sampling = ['a red circle', 'a blue cross', 'square'], [0, 1], Sampling(steps=10)
  ours = generate_jax(pipe, prompts, seeds, sampling)
  theirs = generate_diffusers(PIPELINE, prompts, seeds, sampling, latent_shape=(8, 8, 4))
  assert ours.shape == theirs.shape == (3, 2, 64, 64, 3)
  assert np.abs(ours - theirs).max() <= 2 / 255
  assert score(judge, prompts, ours) == score(judge, prompts, theirs)
