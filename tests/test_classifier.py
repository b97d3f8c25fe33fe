"""The shape/colour classifier: a short training run, robustness, 'none', prediction on both image dtypes, files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esd_jax.shapes_world import classifier, unrecognisable, world
from esd_jax.models.config import ModelConfigError
from esd_jax.models.state_dict import state_dict

SHORT_STEPS = 300  # the shipped classifier trains longer (train_classifier's default); 150 named too few shapes


@pytest.fixture(scope='module')
def model():
  return classifier.train_classifier(SHORT_STEPS, seed=0, log=None)


def test_short_training_is_accurate_and_rejects(model):
  assert model.config['reject']  # train_classifier's default: a judge that can answer 'none'
  for augmented in (False, True):
    accuracy = classifier.held_out_accuracy(model, 500, augmented=augmented)
    assert accuracy['shape'] >= 0.95 and accuracy['colour'] >= 0.95, (augmented, accuracy)
    assert accuracy['rejected_shape'] <= 0.05 and accuracy['rejected_colour'] <= 0.05, (augmented, accuracy)
  rejected = classifier.held_out_unrecognisable(model, 100)
  assert set(rejected) == set(unrecognisable.KINDS)
  assert np.mean([r['rejected'] for r in rejected.values()]) >= 0.75, rejected  # dents and bent sides come last


def test_predict_takes_uint8_and_float(model):
  images, shape_ids, colour_ids, _ = world.sample(11, 37)  # not a multiple of the batch: padding path
  ids_u8 = classifier.predict(model, images, batch_size=16)
  ids_f = classifier.predict(model, images.astype(np.float32) / 255, batch_size=16)
  np.testing.assert_allclose(ids_u8[2], ids_f[2], atol=1e-5)
  np.testing.assert_allclose(ids_u8[3], ids_f[3], atol=1e-5)
  assert ids_u8[2].shape == (37, len(classifier.SHAPE_LABELS)) and np.allclose(ids_u8[2].sum(-1), 1, atol=1e-5)
  assert ids_u8[3].shape == (37, len(classifier.COLOUR_LABELS))
  assert (ids_u8[0] == ids_u8[2].argmax(-1)).all() and (ids_u8[1] == ids_u8[3].argmax(-1)).all()
  with pytest.raises(ValueError, match='NHWC'):
    classifier.predict(model, images[..., 0])


def test_save_load_round_trip(model, tmp_path):
  folder = tmp_path / 'classifier'
  classifier.save_classifier(model, folder)
  assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']
  assert json.loads((folder / 'config.json').read_text())['_class_name'] == 'ShapesClassifier'
  loaded = classifier.load_classifier(folder)
  want, got = state_dict(model), state_dict(loaded)
  assert sorted(want) == sorted(got)
  for key in want:
    assert np.array_equal(np.asarray(want[key]), np.asarray(got[key])), key
  images = world.sample(5, 16)[0]
  assert np.array_equal(classifier.predict(model, images, batch_size=16)[2],
                        classifier.predict(loaded, images, batch_size=16)[2])


def test_a_config_without_reject_loads_a_four_answer_classifier(tmp_path):
  old = classifier.build_classifier({'hidden': 16}, seed=1)  # as saved before judges could answer 'none'
  classifier.save_classifier(old, tmp_path / 'old')
  config = json.loads((tmp_path / 'old' / 'config.json').read_text())
  del config['reject']
  (tmp_path / 'old' / 'config.json').write_text(json.dumps(config))
  loaded = classifier.load_classifier(tmp_path / 'old')
  assert not loaded.config['reject']
  _, _, shape_probs, colour_probs = classifier.predict(loaded, world.sample(2, 3)[0])
  assert shape_probs.shape == colour_probs.shape == (3, 4)


def test_bad_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match='config'):
    classifier.load_classifier(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'_class_name': 'ShapesClassifier', 'depth': 3}))
  with pytest.raises(ModelConfigError, match='depth'):
    classifier.load_classifier(tmp_path)


def test_blur():
  images = jnp.asarray(world.sample(1, 4)[0], jnp.float32) / 255
  blur = jax.jit(classifier._blur)
  np.testing.assert_allclose(blur(images, jnp.zeros(4)), images, atol=1e-6)
  soft = np.asarray(blur(images, jnp.full(4, 1.5)))
  assert np.allclose(soft[:, :2], 1, atol=1e-6)  # white border stays white: edges replicate
  assert 0 < np.abs(soft - np.asarray(images)).max() < 1
  np.testing.assert_allclose(soft.mean((1, 2)), np.asarray(images).mean((1, 2)), atol=2e-3)
