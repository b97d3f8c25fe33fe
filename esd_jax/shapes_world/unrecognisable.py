"""Images the judge must answer "none" to: what an erased model draws instead of a clean shapes-world image.

An erasure does not leave a blank canvas. It damages shapes (triangles with concave sides, pinched squares,
crosses broken into blobs, fragments, several blobs) and colours (blotches of another colour, blends, greys).
A classifier that only knows the world's four shapes and four colours names the nearest one; trained on these
images as well, it can answer "no recognisable shape" (`SHAPE_NONE`) and "no clear colour" (`COLOUR_NONE`).

`sample(rng, n)` draws n images of `KINDS` with their labels: the shape is SHAPE_NONE unless the
image is a clean world shape whose colour alone is wrong; the colour is COLOUR_NONE unless everything drawn is
one flat palette colour. Numpy only, vectorised over the batch: it feeds every training step of the classifier.

The boundary. A generated image of a real shape is a little blurred, noisy, off-colour, bigger or smaller (the
classifier's `augment` and training sides cover that) or wobbly (`faithful` draws its training drawings so),
and must not be rejected; so each distortion here is strong enough that no faithful drawing shows it: bent
sides and dents are at least 10 % of the box side deep and never under 3 px (the classifier trains with blur
up to σ = 1.6 px); fragments lose at least 30 % of their area; split shapes and broken crosses have gaps of
4 px or more, blobs are apart; blotches of another colour cover at least a quarter of the shape; blends are
30…70 % of the way between two palette colours, and greys keep at most 30 % of a palette colour's saturation.
"""

from __future__ import annotations

import functools

import numpy as np

from esd_jax.shapes_world import world

SHAPE_NONE, COLOUR_NONE = len(world.SHAPES), len(world.COLOUR_NAMES)
_SQUARE, _TRIANGLE = world.SHAPES.index('square'), world.SHAPES.index('triangle')
_CIRCLE, _CROSS = world.SHAPES.index('circle'), world.SHAPES.index('cross')
_PALETTE = np.array(list(world.COLOURS.values()), np.float32)
_CENTRES = np.arange(world.SIZE, dtype=np.float32) + 0.5  # pixel centres, as the world's pixel rule has them
_Y, _X = _CENTRES[None, :, None], _CENTRES[None, None, :]


def _col(a) -> np.ndarray:
  """Per-image parameters as (N, 1, 1) (numbers as float32, flags as bool), to broadcast against pixel grids."""
  a = np.asarray(a)
  return (a if a.dtype == bool else a.astype(np.float32)).reshape(-1, 1, 1)


def _shapes(shape_ids, sides, cy, cx, dy=0.0, dx=0.0) -> np.ndarray:
  """(N, H, W) masks of world shapes of box side `sides` centred at (cy, cx) (in pixels: the world's pixel rule
  for the centres of world layouts), sampled at the pixel centres moved by (dy, dx)."""
  shape_ids, s = np.asarray(shape_ids), _col(sides)
  u, v = np.broadcast_arrays(np.abs(2 * (_X + dx - _col(cx))), 2 * (_Y + dy - _col(cy)))
  out = np.empty(u.shape, bool)
  for k, test in enumerate(world.SHAPE_TESTS):
    index = np.flatnonzero(shape_ids == k)
    out[index] = test(u[index], v[index], s[index])
  return out


def _disc(cy, cx, r) -> np.ndarray:
  return np.square(_Y - _col(cy)) + np.square(_X - _col(cx)) <= np.square(_col(r))


def _band(cy, cx, angle, offset, width) -> np.ndarray:
  """The stripe of `width` px whose centre line passes `offset` px from (cy, cx), at `angle` (radians)."""
  across = (_X - _col(cx)) * _col(np.cos(angle)) + (_Y - _col(cy)) * _col(np.sin(angle))
  return np.abs(across - _col(offset)) <= _col(width) / 2


def _paint(masks, colours, images=None) -> np.ndarray:
  """uint8 images: `masks` (N, H, W) painted with `colours` (N, 3) over `images` (default: white)."""
  if images is None:
    images = np.full((*masks.shape, 3), world.BACKGROUND, np.uint8)
  colours = np.clip(np.round(np.asarray(colours, np.float32)), 0, 255).astype(np.uint8)
  return np.where(masks[..., None], colours[:, None, None], images)


@functools.cache
def _upsampling(res: int) -> np.ndarray:
  """(SIZE, res) weights of bilinear interpolation from res samples across the canvas to its pixels."""
  at = np.clip(_CENTRES / world.SIZE * res - 0.5, 0, res - 1)
  low = np.minimum(np.floor(at).astype(int), res - 2)
  w = np.zeros((world.SIZE, res), np.float32)
  w[np.arange(world.SIZE), low] = 1 - (at - low)
  w[np.arange(world.SIZE), low + 1] = at - low
  return w


def _smooth(rng, n: int, res: int, channels: tuple[int, ...] = ()) -> np.ndarray:
  """(n, H, W, *channels) smooth random fields: res × res standard normals interpolated across the canvas."""
  w = _upsampling(res)
  return np.einsum('yi,nij...,xj->nyx...', w, rng.standard_normal((n, res, res, *channels), np.float32), w)


def _bend_sides(rng, mask, s, cy, cx, corners) -> np.ndarray:
  """`mask` with sides of its polygon (`corners`: (N, K, yx) in order) bent inward: each side with probability
  0.7, at least one per image, loses the segment of a disc outside it whose arc passes through two points
  around the side's middle (0.6…1 of its length apart: corner to corner, or a pinch), 10…22 % of the box side
  deep, at least 3 px."""
  n, k = corners.shape[:2]
  ends = np.stack([corners, np.roll(corners, -1, axis=1)], axis=2)  # (N, K, 2, yx)
  bent = rng.random((n, k)) < 0.7
  bent[np.arange(n), rng.integers(0, k, n)] = True
  depth = np.maximum(rng.uniform(0.10, 0.22, (n, k)) * s[:, None], 3.0)
  along = ends[:, :, 1] - ends[:, :, 0]
  half_chord = rng.uniform(0.6, 1.0, (n, k)) * np.linalg.norm(along, axis=-1) / 2
  middle = ends.mean(axis=2)
  normal = along[..., ::-1] * np.array([1, -1], np.float32) / np.linalg.norm(along, axis=-1, keepdims=True)
  outward = np.sum(normal * (middle - np.stack([cy, cx], -1)[:, None]), axis=-1, keepdims=True) > 0
  normal = np.where(outward, normal, -normal)
  radius = (np.square(depth) + np.square(half_chord)) / (2 * depth)  # the circle through the chord's ends
  centre = middle + normal * (radius - depth)[..., None]
  for j in range(k):
    mask = mask & ~(_disc(centre[:, j, 0], centre[:, j, 1], radius[:, j]) & bent[:, j, None, None])
  return mask


def _flat(rng, n: int):
  """Labels and colours of a flat palette colour per image."""
  colour_ids = rng.integers(0, COLOUR_NONE, n)
  return colour_ids, _PALETTE[colour_ids]


# Each kind: (rng, sides, cy, cx) → (uint8 images, shape labels, colour labels), sides and box centres per image.

def _none(n: int):
  """Labels of n images with no shape and no colour."""
  return np.full(n, SHAPE_NONE), np.full(n, COLOUR_NONE)


def _blank(rng, s, cy, cx):
  return np.full((len(s), world.SIZE, world.SIZE, 3), world.BACKGROUND, np.uint8), *_none(len(s))


def _smear(rng, s, cy, cx):
  """White with faint washes of colour, semi-transparent strokes, or coloured speckles: nothing solid."""
  n = len(s)
  variant = rng.integers(0, 3, n)
  alpha = np.zeros((n, world.SIZE, world.SIZE), np.float32)
  colour = 127.5 + 60 * _smooth(rng, n, 4, (3,))  # slowly varying colours, any hue
  # wash: a smooth veil at most 35 % opaque
  alpha = np.where(_col(variant == 0), np.clip(0.12 + 0.12 * _smooth(rng, n, 5), 0, 0.35), alpha)
  # strokes: 2…5 segments 1.5…4 px wide, 30…90 % opaque
  strokes = rng.integers(2, 6, n)
  for j in range(5):
    p, q = rng.uniform(4, world.SIZE - 4, (2, n, 2)).astype(np.float32)
    d = q - p
    t = np.clip(((_Y - _col(p[:, 0])) * _col(d[:, 0]) + (_X - _col(p[:, 1])) * _col(d[:, 1]))
                / _col(np.sum(d * d, -1) + 1e-6), 0, 1)
    near = np.hypot(_Y - _col(p[:, 0]) - t * _col(d[:, 0]), _X - _col(p[:, 1]) - t * _col(d[:, 1]))
    on = (near <= _col(rng.uniform(0.75, 2, n))) & _col((variant == 1) & (j < strokes))
    alpha = np.where(on, np.maximum(alpha, _col(rng.uniform(0.3, 0.9, n))), alpha)
  # speckles: 3…15 % of pixels
  alpha = np.where(_col(variant == 2) & (rng.random(alpha.shape) < _col(rng.uniform(0.03, 0.15, n))), 1, alpha)
  images = 255 * (1 - alpha[..., None]) + np.clip(colour, 0, 255) * alpha[..., None]
  return np.round(images).astype(np.uint8), *_none(n)


def _fragment(rng, s, cy, cx):
  """A world shape with large parts cut away: 1…3 discs bitten out of it, keeping 15…70 % of its area, or a
  stripe (≥ 4 px) through it splitting it in two."""
  n = len(s)
  shape_ids = rng.integers(0, SHAPE_NONE, n)
  whole = _shapes(shape_ids, s, cy, cx)
  area = whole.sum((1, 2))
  masks, todo = np.empty_like(whole), np.arange(n)
  while todo.size:  # redraw the few cuts that took too little or too much
    m, si, yi, xi = len(todo), s[todo], cy[todo], cx[todo]
    split, bites = rng.random(m) < 1 / 3, rng.integers(1, 4, m)
    cut = _band(yi, xi, rng.uniform(0, np.pi, m), rng.uniform(-0.15, 0.15, m) * si,
                np.maximum(rng.uniform(0.12, 0.25, m) * si, 4)) & _col(split)
    for j in range(3):
      angle, reach = rng.uniform(0, 2 * np.pi, m), rng.uniform(0.25, 0.55, m) * si
      radius = rng.uniform(0.3, 0.6, m) * si
      cut |= _disc(yi + reach * np.sin(angle), xi + reach * np.cos(angle), radius) & _col(~split & (j < bites))
    kept = whole[todo] & ~cut
    fraction = kept.sum((1, 2)) / area[todo]
    ok = (fraction >= 0.15) & ((fraction <= 0.7) | split)
    masks[todo[ok]] = kept[ok]
    todo = todo[~ok]
  colour_ids, colours = _flat(rng, n)
  return _paint(masks, colours), np.full(n, SHAPE_NONE), colour_ids


def _blobs(rng, s, cy, cx):
  """2…4 small pieces (discs, ellipses, small world shapes of 6…12 px) in separate cells of a 3 × 3 grid,
  2 px apart at least; in 30 % of images each piece has its own palette colour."""
  n = len(s)
  count = rng.integers(2, 5, n)
  cells = np.argsort(rng.random((n, 9)), axis=1)
  colour_ids = rng.integers(0, COLOUR_NONE, n)
  mixed = rng.random(n) < 0.3
  images = np.full((n, world.SIZE, world.SIZE, 3), world.BACKGROUND, np.uint8)
  seen = np.zeros((n, COLOUR_NONE), bool)
  for j in range(4):
    y = 14 + 18 * (cells[:, j] // 3) + rng.uniform(-2, 2, n)
    x = 14 + 18 * (cells[:, j] % 3) + rng.uniform(-2, 2, n)
    ry, rx = rng.uniform(3, 6, (2, n))
    ellipse = np.square((_Y - _col(y)) / _col(ry)) + np.square((_X - _col(x)) / _col(rx)) <= 1
    shape = _shapes(rng.integers(0, SHAPE_NONE, n), rng.integers(6, 13, n), y, x)
    piece = np.where(_col(rng.random(n) < 0.5), ellipse, shape) & _col(j < count)
    own = np.where(mixed, rng.integers(0, COLOUR_NONE, n), colour_ids)
    images = _paint(piece, _PALETTE[own], images)
    seen[np.arange(n), own] |= j < count
  one_colour = seen.sum(1) == 1
  return images, np.full(n, SHAPE_NONE), np.where(one_colour, seen.argmax(1), COLOUR_NONE)


def _box_corners(s, cy, cx, shape: int) -> np.ndarray:
  """(N, K, yx) corners of the square or triangle of box side s centred at (cy, cx), in order round it."""
  h = s / 2
  if shape == _SQUARE:
    corners = [(cy - h, cx - h), (cy - h, cx + h), (cy + h, cx + h), (cy + h, cx - h)]
  else:
    corners = [(cy - h, cx), (cy + h, cx + h), (cy + h, cx - h)]
  return np.stack([np.stack(c, -1) for c in corners], axis=1).astype(np.float32)


def _bent(shape: int):
  def kind(rng, s, cy, cx):
    n = len(s)
    masks = _bend_sides(rng, _shapes(np.full(n, shape), s, cy, cx), s, cy, cx, _box_corners(s, cy, cx, shape))
    colour_ids, colours = _flat(rng, n)
    return _paint(masks, colours), np.full(n, SHAPE_NONE), colour_ids
  kind.__doc__ = f'A {world.SHAPES[shape]} with sides bent inward (see _bend_sides).'
  return kind


def _broken_cross(rng, s, cy, cx):
  """A cross whose arms are cut off its centre by gaps (≥ 4 px, at least one arm), or a plus of separate
  blobs: a disc at the centre and at 3…4 arms."""
  n = len(s)
  w = s / 3  # bar width
  gaps = _shapes(np.full(n, _CROSS), s, cy, cx)
  cut = rng.random((n, 4)) < 0.7
  cut[np.arange(n), rng.integers(0, 4, n)] = True
  gap = np.maximum(rng.uniform(0.1, 0.16, n) * s, 4)
  blobs = _disc(cy, cx, rng.uniform(0.3, 0.45, n) * w)
  arms = rng.random((n, 4)) < 0.75
  arms[np.arange(n), rng.integers(0, 4, n)] = True
  for j, (dy, dx) in enumerate(((-1, 0), (1, 0), (0, -1), (0, 1))):
    at = w / 2 + gap / 2 + rng.uniform(0, 0.5, n) * (s / 2 - w / 2 - gap)  # the gap's centre, from the centre
    across = _band(cy + dy * at, cx + dx * at, np.full(n, np.arctan2(dy, dx)), 0, gap)
    gaps &= ~(across & _col(cut[:, j]))  # the stripe crosses only this arm: it starts beyond the other bar
    reach = rng.uniform(1.0, 1.2, n) * w
    blobs |= _disc(cy + dy * reach, cx + dx * reach, rng.uniform(0.3, 0.45, n) * w) & _col(arms[:, j])
  colour_ids, colours = _flat(rng, n)
  return _paint(np.where(_col(rng.random(n) < 0.5), gaps, blobs), colours), np.full(n, SHAPE_NONE), colour_ids


def _waves(rng, amplitude, wavelength):
  """(dy, dx) displacements: a sine of `amplitude` px and `wavelength` px (per image) along each axis."""
  phase = rng.uniform(0, 2 * np.pi, (2, len(amplitude)))
  return tuple(_col(amplitude) * np.sin(2 * np.pi * grid / _col(wavelength) + _col(p))
               for grid, p in zip((_X, _Y), phase))


def faithful(rng: np.random.Generator, shape_ids, colour_ids, sides, positions) -> np.ndarray:
  """The other side of the boundary: world.draw's images with edges that wobble as a generation's do, by
  0…2.5 % of the box side either way over a wavelength of 1…2 sides (at most half as deep as the mildest
  distortion here, and slower), for the classifier to learn that this is still the shape."""
  n, sides = len(shape_ids), np.asarray(sides)
  dy, dx = _waves(rng, rng.uniform(0, 0.025, n) * sides, rng.uniform(1, 2, n) * sides)
  centre = np.asarray(positions) + sides[:, None] / 2
  return _paint(_shapes(shape_ids, sides, centre[:, 0], centre[:, 1], dy, dx), _PALETTE[np.asarray(colour_ids)])


def _dented(rng, s, cy, cx):
  """Other non-convex distortions: a circle with 3…5 dents (one big bite is a fragment), a flower (radius
  r₀(1 + a cos kθ), k = 5…7, a = 0.15…0.3), or a circle, square or triangle with wavy edges (8…12 % of its
  side, ≥ 3 px; not a cross, whose narrow bars a faithful generation bends as much)."""
  n = len(s)
  variant = rng.integers(0, 3, n)
  r = s / 2
  dented, dents = _shapes(np.full(n, _CIRCLE), s, cy, cx), rng.integers(3, 6, n)
  for j in range(5):
    angle, depth = rng.uniform(0, 2 * np.pi, n), np.maximum(rng.uniform(0.25, 0.45, n) * r, 4)
    radius = rng.uniform(0.3, 0.5, n) * r
    dent = _disc(cy + (r + radius - depth) * np.sin(angle), cx + (r + radius - depth) * np.cos(angle), radius)
    dented &= ~(dent & _col(j < dents))
  a, k = rng.uniform(0.15, 0.3, n), rng.integers(5, 8, n)
  theta = np.arctan2(_Y - _col(cy), _X - _col(cx))
  flower = np.hypot(_Y - _col(cy), _X - _col(cx)) <= _col(r / (1 + a)) * (
      1 + _col(a) * np.cos(_col(k) * theta + _col(rng.uniform(0, 2 * np.pi, n))))
  waves = _waves(rng, np.maximum(rng.uniform(0.08, 0.12, n) * s, 3), rng.uniform(0.35, 0.6, n) * s)
  wavy = _shapes(rng.choice([_CIRCLE, _SQUARE, _TRIANGLE], n), s, cy, cx, *waves)
  masks = np.where(_col(variant == 0), dented, np.where(_col(variant == 1), flower, wavy))
  colour_ids, colours = _flat(rng, n)
  return _paint(masks, colours), np.full(n, SHAPE_NONE), colour_ids


def _two_colours(rng, s, cy, cx):
  """A clean world shape in one palette colour with blotches of another over 25…60 % of it."""
  n = len(s)
  shape_ids = rng.integers(0, SHAPE_NONE, n)
  masks = _shapes(shape_ids, s, cy, cx)
  first = rng.integers(0, COLOUR_NONE, n)
  second = (first + rng.integers(1, COLOUR_NONE, n)) % COLOUR_NONE
  field = np.where(masks, _smooth(rng, n, 6), np.inf).reshape(n, -1)
  # The threshold that puts the chosen fraction of the shape's pixels under it.
  rank = np.floor(rng.uniform(0.25, 0.6, n) * masks.sum((1, 2))).astype(int)
  threshold = np.sort(field, axis=1)[np.arange(n), rank]
  blotches = field.reshape(masks.shape) < _col(threshold)
  images = _paint(blotches, _PALETTE[second], _paint(masks, _PALETTE[first]))
  return images, shape_ids, np.full(n, COLOUR_NONE)


def _blend(rng, s, cy, cx):
  """A clean world shape in a colour 30…70 % of the way between two palette colours (red + green: brown)."""
  n = len(s)
  shape_ids = rng.integers(0, SHAPE_NONE, n)
  first = rng.integers(0, COLOUR_NONE, n)
  second = (first + rng.integers(1, COLOUR_NONE, n)) % COLOUR_NONE
  t = rng.uniform(0.3, 0.7, (n, 1))
  colours = (1 - t) * _PALETTE[first] + t * _PALETTE[second]
  return _paint(_shapes(shape_ids, s, cy, cx), colours), shape_ids, np.full(n, COLOUR_NONE)


def _grey(rng, s, cy, cx):
  """A clean world shape in a grey (30…200) or a palette colour keeping 0…30 % of its saturation."""
  n = len(s)
  shape_ids = rng.integers(0, SHAPE_NONE, n)
  _, colours = _flat(rng, n)
  luma = colours @ np.array([0.299, 0.587, 0.114], np.float32)
  faded = luma[:, None] + rng.uniform(0, 0.3, (n, 1)) * (colours - luma[:, None])
  colours = np.where(rng.random((n, 1)) < 0.5, rng.uniform(30, 200, (n, 1)).repeat(3, 1), faded)
  return _paint(_shapes(shape_ids, s, cy, cx), colours), shape_ids, np.full(n, COLOUR_NONE)


# name → (how it draws, its weight in `sample`); kind ids index this order. What shows plainly (a blank, a
# blend) is drawn a third as often as the subtle bites, dents and bent sides that a classifier learns last.
KINDS = {
    'blank': (_blank, 1), 'smear': (_smear, 1), 'fragment': (_fragment, 3), 'blobs': (_blobs, 2),
    'concave_triangle': (_bent(_TRIANGLE), 3), 'pinched_square': (_bent(_SQUARE), 2),
    'broken_cross': (_broken_cross, 2), 'dented': (_dented, 3), 'two_colours': (_two_colours, 2),
    'blend': (_blend, 1), 'grey': (_grey, 1),
}
_WEIGHTS = np.array([w for _, w in KINDS.values()]) / sum(w for _, w in KINDS.values())


def draw(kind: str, rng: np.random.Generator, n: int, *, sides: tuple[int, int] = (world.MIN_SIDE, world.MAX_SIDE),
         margin: int = world.MARGIN):
  """n images of one kind: (uint8 (n, 64, 64, 3), shape labels, colour labels). Boxes of side uniform in
  `sides`, placed uniformly within `margin` px of the canvas' edges (the world's layout by default)."""
  s = rng.integers(sides[0], sides[1] + 1, n)
  y0, x0 = rng.integers(margin, world.SIZE - margin - s + 1, (2, n))
  images, shapes, colours = KINDS[kind][0](rng, s.astype(np.float32), y0 + s / 2, x0 + s / 2)
  return images, shapes.astype(np.int64), colours.astype(np.int64)


def sample(rng: np.random.Generator, n: int, **layout):
  """n images of kinds drawn with KINDS' weights: (uint8 (n, 64, 64, 3), shape labels, colour labels, kind
  ids into KINDS). `layout`: draw's sides and margin."""
  kinds = rng.choice(len(KINDS), n, p=_WEIGHTS)
  images = np.empty((n, world.SIZE, world.SIZE, 3), np.uint8)
  shapes, colours = np.empty(n, np.int64), np.empty(n, np.int64)
  for k, name in enumerate(KINDS):
    index = np.flatnonzero(kinds == k)
    if index.size:
      images[index], shapes[index], colours[index] = draw(name, rng, index.size, **layout)
  return images, shapes, colours, kinds
