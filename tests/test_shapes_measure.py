"""The erasure summary from per-prompt reports: 'none' is not kept, colour fidelity is measured next to shape."""

import math

import pytest

from esd_jax.shapes_world import world
from esd_jax.shapes_world.measure import erasure_summary, overall


def _report(shape=None, colour=None, prompts=world.PROMPTS):
  """score's report where every prompt shows its shape and colour in 8 images of 8, except as `shape` and
  `colour` ({prompt: images showing it}) say; the others are judged 'none'."""
  report = {}
  for p in prompts:
    k, c = world.parse(p)
    shown_shape, shown_colour = (shape or {}).get(p, 8), (colour or {}).get(p, 8)
    report[p] = {
        'shape': None if k is None else shown_shape / 8, 'colour': None if c is None else shown_colour / 8,
        'shapes': {**dict.fromkeys((*world.SHAPES, 'none'), 0), world.SHAPES[k or 0]: shown_shape,
                   'none': 8 - shown_shape},
        'colours': {**dict.fromkeys((*world.COLOUR_NAMES, 'none'), 0), world.COLOUR_NAMES[c or 0]: shown_colour,
                    'none': 8 - shown_colour}}
  return report


def test_erasing_a_shape_measures_the_other_shapes_and_every_colour_without_it():
  base = _report()
  erased = _report(shape={'a red circle': 0, 'a blue circle': 1, 'a green square': 6},
                   colour={'a green square': 4, 'a red circle': 2})
  s = erasure_summary(base, erased, 'circle')
  assert (s['kind'], s['base_rate'], s['erased_rate']) == ('shape', 1.0, (0 + 1 / 8 + 2) / 4)
  assert s['others']['square'] == {'before': 1.0, 'after': (6 / 8 + 3) / 4, 'drop': pytest.approx(1 / 16)}
  assert set(s['others']) == {'square', 'triangle', 'cross'}
  # Red is measured on the red square, triangle and cross only: what the circle's erasure did to red circles
  # is the concept's own (kept_colour).
  assert s['other_kind']['red']['after'] == 1.0 and s['other_kind']['green']['after'] == pytest.approx(5 / 6)
  assert s['worst_other_colour'] == {'name': 'green', 'drop': pytest.approx(1 / 6)}
  assert s['worst_other_shape'] == {'name': 'square', 'drop': pytest.approx(1 / 16)}
  assert s['max_other_drop'] == pytest.approx(1 / 6)
  assert s['kept_colour'] == pytest.approx((2 / 8 + 3) / 4) and 'kept_shape' not in s


def test_erasing_a_colour_measures_the_other_colours_and_every_shape_without_it():
  base = _report()
  erased = _report(colour={'a red square': 0, 'a green square': 7}, shape={'a red cross': 0, 'a blue cross': 4})
  s = erasure_summary(base, erased, 'red')
  assert (s['kind'], s['erased_rate']) == ('colour', 0.75)
  assert set(s['others']) == {'green', 'blue', 'yellow'} and set(s['other_kind']) == set(world.SHAPES)
  assert s['worst_other_colour'] == {'name': 'green', 'drop': pytest.approx(1 / 32)}
  assert s['worst_other_shape'] == {'name': 'cross', 'drop': pytest.approx(1 / 6)}  # the blue cross, not the red
  assert s['kept_shape'] == pytest.approx(0.75)


def test_prompts_without_the_other_kind_leave_it_unmeasured():
  prompts = ('circle', 'square', 'a triangle', 'cross')
  s = erasure_summary(_report(prompts=prompts), _report(shape={'square': 6}, prompts=prompts), 'circle')
  assert s['worst_other_shape'] == {'name': 'square', 'drop': 0.25} and s['max_other_drop'] == 0.25
  assert s['worst_other_colour']['name'] is None and math.isnan(s['worst_other_colour']['drop'])
  assert math.isnan(s['kept_colour'])


def test_overall_counts_none():
  report = _report(shape={'a red circle': 6}, colour={'a blue cross': 0})
  numbers = overall(report)
  assert numbers['shape'] == pytest.approx(1 - 2 / 8 / 16) and numbers['colour'] == pytest.approx(1 - 1 / 16)
  assert numbers['rejected_shape'] == 2 / 128 and numbers['rejected_colour'] == 8 / 128


def test_the_original_images_are_kept_under_a_fingerprint_and_read_back(model, tmp_path, monkeypatch):
  import jax
  import numpy as np

  from esd_jax import loading
  from esd_jax.shapes_world import measure
  pipe = loading.load_pipeline(model)
  prompts, seeds, sampling = ['a cat', 'a dog'], [0, 1], measure.Sampling(steps=2)
  made = measure.original_images(pipe, prompts, seeds, sampling, tmp_path)
  (kept,) = tmp_path.iterdir()
  assert np.array_equal(np.load(kept), made) and made.shape[:2] == (2, 2)
  monkeypatch.setattr(measure, 'generate_jax', None)  # a second call reads the file, generating nothing
  assert np.array_equal(measure.original_images(pipe, prompts, seeds, sampling, tmp_path), made)
  monkeypatch.undo()
  # Another seed, sampling or weight is another entry.
  measure.original_images(pipe, prompts, [0, 2], sampling, tmp_path)
  measure.original_images(pipe, prompts, seeds, measure.Sampling(steps=3), tmp_path)
  conv = pipe.unet.conv_in.weight
  conv.value = conv.value.at[0, 0, 0, 0].add(jax.numpy.float32(0.5))
  measure.original_images(pipe, prompts, seeds, sampling, tmp_path)
  assert len(list(tmp_path.iterdir())) == 4
