"""The shapes world: geometry and colours as issue 4 fixes them, layouts, captions, reproducibility."""

import collections
import math

import numpy as np
import pytest
from transformers import CLIPTokenizer

from esd_jax.shapes_world import world
from esd_jax.tokenizer import write_clip_tokenizer

SIDES = range(world.MIN_SIDE, world.MAX_SIDE + 1)
CIRCLE, SQUARE, TRIANGLE, CROSS = range(4)


def _mask(shape_id, side, position=(7, 9)):
  return world.masks([shape_id], [side], [position])[0]


def _bbox(mask):
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return rows[0], rows[-1], cols[0], cols[-1]


@pytest.mark.parametrize('side', SIDES)
def test_areas(side):
  s2 = side * side
  assert _mask(SQUARE, side).sum() == s2
  # Pixel-centre sampling errs by a fraction of the perimeter; these bounds are well under one pixel row.
  assert abs(_mask(CIRCLE, side).sum() - math.pi * s2 / 4) <= 0.5 * side
  assert abs(_mask(TRIANGLE, side).sum() - s2 / 2) <= 0.1 * side
  cross = _mask(CROSS, side)
  width = cross[:, 9 + 1].sum()  # a column of the horizontal bar, outside the vertical one
  assert abs(width - side / 3) <= 1
  assert cross.sum() == 2 * side * width - width * width
  assert abs(cross.sum() - 5 * s2 / 9) <= side


@pytest.mark.parametrize('shape_id', range(4))
@pytest.mark.parametrize('side', [24, 31, 44])
def test_each_shape_fills_its_box(shape_id, side):
  y0, x0 = 7, 9
  mask = _mask(shape_id, side, (y0, x0))
  box = np.zeros_like(mask)
  box[y0:y0 + side, x0:x0 + side] = True
  assert not (mask & ~box).any()
  top, bottom, left, right = _bbox(mask)
  assert (left, right, bottom) == (x0, x0 + side - 1, y0 + side - 1)
  # The triangle's apex sits on a pixel boundary when s is even: no pixel centre of the top row is inside.
  assert top == y0 + (shape_id == TRIANGLE and side % 2 == 0)
  patch = mask[y0:y0 + side, x0:x0 + side]
  assert (patch == patch[:, ::-1]).all()  # every shape is symmetric about the box's vertical axis
  if shape_id != TRIANGLE:
    assert (patch == patch[::-1]).all() and (patch == patch.T).all()


def test_shape_details():
  side, c = 30, 15
  circle, triangle, cross = (_mask(k, side, (0, 0)) for k in (CIRCLE, TRIANGLE, CROSS))
  assert not circle[0, 0] and circle[c, c] and circle[0, c] and circle[c, 0]
  widths = triangle[:side].sum(1)
  assert widths[-1] == side and (np.diff(widths) >= 0).all()  # base along the bottom edge, widening downward
  assert not cross[0, 0] and not cross[9, 9] and cross[c, 0] and cross[0, c] and cross[c, c]


def test_colours_and_background_exact():
  images, shape_ids, colour_ids, _ = world.sample(0, 256)
  palette = np.array(list(world.COLOURS.values()))
  assert palette.tolist() == [[220, 40, 40], [40, 170, 60], [40, 80, 220], [230, 200, 40]]
  white = (images == 255).all(-1)
  painted = (images == palette[colour_ids][:, None, None, :]).all(-1)
  assert (white | painted).all()
  assert painted.sum((1, 2)).min() >= 24 * 24 * 0.5
  assert white[:, :4].all() and white[:, -4:].all() and white[:, :, :4].all() and white[:, :, -4:].all()


def test_layouts_cover_the_world():
  shape_ids, colour_ids, sizes, positions = world.sample_layout(np.random.default_rng(1), 40_000)
  assert set(shape_ids) == set(range(4)) and set(colour_ids) == set(range(4))
  assert set(sizes) == set(SIDES)
  ends = positions + sizes[:, None] - 1
  assert positions.min() == world.MARGIN and ends.max() == world.SIZE - 1 - world.MARGIN
  for side in (24, 44):  # the extreme placements of the extreme sizes are reachable
    at = positions[sizes == side]
    assert at.min() == 4 and at.max() == 60 - side
  counts = np.bincount(shape_ids * 4 + colour_ids, minlength=16)
  assert counts.min() > 0.9 * 40_000 / 16


def test_reproducible():
  a, b = world.sample(3, 64), world.sample(np.random.default_rng(3), 64)
  assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and (a[2] == b[2]).all() and a[3] == b[3]
  assert not (a[0] == world.sample(4, 64)[0]).all()


def test_draw_validates():
  with pytest.raises(ValueError, match='shape ids'):
    world.draw([4], [0], [30], [(4, 4)])
  with pytest.raises(ValueError, match='colour ids'):
    world.draw([0], [4], [30], [(4, 4)])
  with pytest.raises(ValueError, match='one of each'):
    world.draw([0, 1], [0, 1], [30], [(4, 4)])


def test_captions_describe_their_images():
  assert math.isclose(sum(p for _, p in world.CAPTIONS), 1.0)
  n = 40_000
  shape_ids, colour_ids, _, _ = world.sample_layout(np.random.default_rng(2), n)
  captions = world.captions(np.random.default_rng(2), shape_ids, colour_ids)
  counts = collections.Counter(captions)
  assert abs(counts[''] / n - 0.10) < 0.01
  for caption, k, c in zip(captions, shape_ids, colour_ids):
    assert set(caption.split()) <= set(world.WORDS)
    shape, colour = world.parse(caption)
    assert shape in (None, k) and colour in (None, c)
  for word in world.WORDS:  # every word is, on its own, a caption the model trains on
    assert counts[word] > 0, word
  for prompt in ('a red circle', 'circle', 'a circle', 'red circle', 'a red shape', 'red'):
    assert counts[prompt] > 0, prompt


def test_prompts():
  assert len(set(world.PROMPTS)) == 16
  for k in range(4):
    for c in range(4):
      prompt = world.PROMPTS[4 * k + c]
      assert prompt == f'a {world.COLOUR_NAMES[c]} {world.SHAPES[k]}'
      assert world.parse(prompt) == (k, c)
  assert world.parse('A Shape') == (None, None)


def test_every_word_is_one_token(tmp_path):
  write_clip_tokenizer(tmp_path / 'tokenizer', world.WORDS, model_max_length=8)
  tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / 'tokenizer'))
  for template, _ in world.CAPTIONS:
    caption = template.format(colour='yellow', shape='triangle')
    assert tokenizer.tokenize(caption) == [w + '</w>' for w in caption.split()]
