"""The judge's unrecognisable images: labels true of what is drawn, distortions that no clean shape shows,
reproducible draws."""

import numpy as np
import pytest

from esd_jax.shapes_world import unrecognisable, world

NONE_SHAPE, NONE_COLOUR = unrecognisable.SHAPE_NONE, unrecognisable.COLOUR_NONE
PALETTE = np.array(list(world.COLOURS.values()))
KEEPS_SHAPE = {'two_colours', 'blend', 'grey'}


def _closest_world_shape(image):
  """(IoU, shape id) of the world shape that best covers the drawn pixels, in the box their extent gives."""
  drawn = (image != 255).any(-1)
  rows, cols = np.flatnonzero(drawn.any(1)), np.flatnonzero(drawn.any(0))
  if not rows.size:
    return 0.0, None
  side = max(cols[-1] - cols[0], rows[-1] - rows[0]) + 1
  # A shape's box has its bottom row and both sides drawn (a triangle of even side misses the top row).
  shapes = world.masks(range(4), [side] * 4, [(rows[-1] - side + 1, cols[0])] * 4)
  ious = (shapes & drawn).sum((1, 2)) / (shapes | drawn).sum((1, 2))
  return float(ious.max()), int(ious.argmax())


@pytest.mark.parametrize('kind', list(unrecognisable.KINDS))
def test_labels_are_true_of_the_images(kind):
  images, shapes, colours = unrecognisable.draw(kind, np.random.default_rng(3), 64)
  assert images.shape == (64, world.SIZE, world.SIZE, 3) and images.dtype == np.uint8
  assert shapes.shape == colours.shape == (64,)
  assert (shapes == NONE_SHAPE).all() != (kind in KEEPS_SHAPE)
  for image, shape, colour in zip(images, shapes, colours):
    drawn = (image != 255).any(-1)
    pixels = np.unique(image[drawn], axis=0)
    if colour != NONE_COLOUR:  # one flat palette colour, and it is the label's
      assert len(pixels) == 1 and (pixels[0] == PALETTE[colour]).all(), (kind, pixels)
    iou, closest = _closest_world_shape(image)
    if shape != NONE_SHAPE:  # exactly a world shape: only its colour is wrong
      assert (iou, closest) == (1.0, shape), kind
    elif kind != 'smear':  # nothing a clean shape looks like: ≥ 2.5 % of the pixels off the closest one
      assert iou <= 0.975, (kind, iou, world.SHAPES[closest])


def test_colours_are_unclear():
  rng = np.random.default_rng(4)
  for kind in ('blend', 'grey'):
    images, _, colours = unrecognisable.draw(kind, rng, 200)
    assert (colours == NONE_COLOUR).all()
    flat = np.stack([np.unique(image[(image != 255).any(-1)], axis=0)[0] for image in images]).astype(int)
    # Every channel-wise distance to the palette is well beyond the ±8 % gain and ±0.06 offset of `augment`.
    assert np.abs(flat[:, None] - PALETTE[None]).max(-1).min() >= 45, kind
  images, _, _ = unrecognisable.draw('two_colours', rng, 200)
  for image in images:
    drawn = image[(image != 255).any(-1)]
    pixels, counts = np.unique(drawn, axis=0, return_counts=True)
    assert len(pixels) == 2 and all((PALETTE == p).all(-1).any() for p in pixels)
    assert counts.min() / counts.sum() >= 0.24  # blotches over a quarter of the shape at least


def test_sample_is_reproducible_and_mixes_every_kind():
  a = unrecognisable.sample(np.random.default_rng(5), 400, sides=(16, 52), margin=0)
  b = unrecognisable.sample(np.random.default_rng(5), 400, sides=(16, 52), margin=0)
  for x, y in zip(a, b):
    assert np.array_equal(x, y)
  images, shapes, colours, kinds = a
  assert set(kinds) == set(range(len(unrecognisable.KINDS)))
  assert ((shapes == NONE_SHAPE) | (colours == NONE_COLOUR)).all()  # nothing here is a clean world image
  assert (shapes <= NONE_SHAPE).all() and (colours <= NONE_COLOUR).all() and (shapes >= 0).all()
