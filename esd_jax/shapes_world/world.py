"""The shapes world: 64×64 RGB images of one flat-coloured shape on white, drawn on the fly, captioned.

The world (fixed by issue 4, so anyone can draw and check it):
- 64×64 RGB, white background (255, 255, 255), exactly one shape filled with one flat colour (`COLOURS`).
- Each shape lies in an axis-aligned square box of side s, s uniform in 24…44 px; the box is placed
  uniformly so that it lies within pixels 4…59: its top-left pixel (y0, x0) is uniform in 4…60-s on each
  axis. `circle` is the disk filling the box, `square` the box, `triangle` has its apex at the top middle
  and its base along the bottom edge, `cross` is a plus sign of two bars of width s/3 through the centre
  spanning the box.

Pixel-exact semantics: pixel (row i, column j) covers [j, j+1) × [i, i+1) and is painted iff its centre
(j + ½, i + ½) lies inside the shape or on its boundary. The box spans [x0, x0+s] × [y0, y0+s] in these
continuous coordinates, so a square is exactly the s×s pixels from (y0, x0). Every test is evaluated in
integers on doubled coordinates relative to the box centre, u = 2(j - x0) + 1 - s and v = 2(i - y0) + 1 - s
(integers of the parity of s - 1), so no rounding is involved:
  square    |u| < s and |v| < s                 (s² pixels exactly)
  circle    u² + v² ≤ s²                        (≈ π s²/4)
  triangle  |v| < s and 2|u| ≤ v + s            (≈ s²/2: half-width grows linearly from 0 at the apex)
  cross     in the box and (3|u| ≤ s or 3|v| ≤ s)  (≈ 5 s²/9; never on a bar's edge, so no ties)

Captions (see `CAPTIONS`): every colour and shape word is a prompt on its own, because users erase a concept
by naming it and a model that never saw "circle" alone cannot be asked to forget it. Each image gets one
template drawn with the probabilities below, filled with its own colour and shape, so every caption is true
of its image; about 10 % of captions are empty, for classifier-free guidance. Per image, the caption
  names its shape (alone or with more words)   60 %   ("circle" alone 12 %, "a circle" 12 %)
  names its colour                             58 %   ("red" alone 10 %)
  names both ("a red circle", "red circle")    36 %
  generic ("a", "shape", "a shape")             8 %,  empty 10 %.
Shapes and colours are independent and uniform, so each of the 16 combinations is 1/16 of the data.
"""

from __future__ import annotations

import re

import numpy as np

SIZE = 64
BACKGROUND = (255, 255, 255)
COLOURS = {
    'red': (220, 40, 40),
    'green': (40, 170, 60),
    'blue': (40, 80, 220),
    'yellow': (230, 200, 40),
}
SHAPES = ('circle', 'square', 'triangle', 'cross')
COLOUR_NAMES = tuple(COLOURS)
MIN_SIDE, MAX_SIDE = 24, 44
MARGIN = 4  # the box lies within pixels MARGIN … SIZE-1-MARGIN

# (template, probability). '{colour}' and '{shape}' are the image's own; 'shape' is the generic noun,
# so "a red shape" says only the colour, and "a", "shape", "a shape" describe any image.
CAPTIONS = (
    ('', 0.10),
    ('a {colour} {shape}', 0.24),
    ('{colour} {shape}', 0.12),
    ('a {shape}', 0.12),
    ('{shape}', 0.12),
    ('{colour}', 0.10),
    ('a {colour} shape', 0.08),
    ('{colour} shape', 0.04),
    ('a shape', 0.04),
    ('shape', 0.02),
    ('a', 0.02),
)
WORDS = ('a', 'shape', *COLOUR_NAMES, *SHAPES)
# The evaluation prompts, shape-major: PROMPTS[4 * shape_id + colour_id].
PROMPTS = tuple(f'a {colour} {shape}' for shape in SHAPES for colour in COLOUR_NAMES)

# Shape membership in doubled coordinates relative to the box centre (module docstring), u already |u|: integer
# arrays for the exact pixel rule, or floats for callers that draw distorted shapes (unrecognisable.py).
SHAPE_TESTS = (
    lambda u, v, s: u * u <= s * s - v * v,  # circle
    lambda u, v, s: (u < s) & (np.abs(v) < s),  # square
    lambda u, v, s: (np.abs(v) < s) & (2 * u <= v + s),  # triangle (2|u| ≤ v + s implies |u| < s)
    lambda u, v, s: (u < s) & (np.abs(v) < s) & ((3 * u <= s) | (3 * np.abs(v) <= s)),  # cross
)
_PALETTE = np.array(list(COLOURS.values()), np.uint8)
_CAPTION_P = np.array([p for _, p in CAPTIONS])


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def masks(shape_ids, sizes, positions, *, size: int = SIZE) -> np.ndarray:
  """Boolean (N, size, size) masks of the shapes (see the module docstring for the pixel rule).

  `positions` is (N, 2): the box's top-left pixel as (row y0, column x0). Boxes may leave the canvas
  (only the part inside is drawn), so callers can draw beyond the world's ranges, e.g. for augmentation.
  """
  shape_ids, sizes = np.asarray(shape_ids), np.asarray(sizes, np.int32)
  positions = np.asarray(positions, np.int32).reshape(-1, 2)
  if not (len(shape_ids) == len(sizes) == len(positions)):
    raise ValueError(f'masks: {len(shape_ids)} shape ids, {len(sizes)} sizes and {len(positions)} positions; '
                     'pass one of each per image.')
  if np.any((shape_ids < 0) | (shape_ids >= len(SHAPES))) or np.any(sizes < 1):
    raise ValueError(f'masks: shape ids must be in 0…{len(SHAPES) - 1} and sizes positive.')
  grid = np.arange(size, dtype=np.int32)
  s = sizes[:, None, None]
  u = np.abs(2 * (grid[None, None, :] - positions[:, 1, None, None]) + 1 - s)  # (N, 1, W)
  v = 2 * (grid[None, :, None] - positions[:, 0, None, None]) + 1 - s  # (N, H, 1)
  # Each test broadcasts a row term against a column term, so the only (N, H, W) work is a few comparisons.
  out = np.empty((len(shape_ids), size, size), bool)
  for k, test in enumerate(SHAPE_TESTS):
    index = np.flatnonzero(shape_ids == k)
    out[index] = test(u[index], v[index], s[index])
  return out


def draw(shape_ids, colour_ids, sizes, positions) -> np.ndarray:
  """uint8 (N, 64, 64, 3) images: shape `shape_ids[n]` in colour `colour_ids[n]`, box side `sizes[n]`,
  box top-left pixel `positions[n]` = (row, column), on white."""
  colour_ids = np.asarray(colour_ids)
  if np.any((colour_ids < 0) | (colour_ids >= len(COLOURS))):
    raise ValueError(f'draw: colour ids must be in 0…{len(COLOURS) - 1}.')
  inside = masks(shape_ids, sizes, positions)
  images = np.full((*inside.shape, 3), BACKGROUND, np.uint8)
  for c in range(3):  # a masked copy per channel is several times faster than one broadcast np.where
    np.copyto(images[..., c], _PALETTE[colour_ids, c][:, None, None], where=inside)
  return images


def sample_layout(rng: np.random.Generator | int, n: int):
  """The world's random draw of n images: (shape_ids, colour_ids, sizes, positions), all uniform."""
  rng = _as_rng(rng)
  shape_ids = rng.integers(0, len(SHAPES), n)
  colour_ids = rng.integers(0, len(COLOURS), n)
  sizes = rng.integers(MIN_SIDE, MAX_SIDE + 1, n)
  # Top-left pixel uniform in MARGIN … SIZE-MARGIN-s, so the last pixel SIZE-1-MARGIN is still inside.
  positions = rng.integers(MARGIN, SIZE - MARGIN - sizes[:, None] + 1, (n, 2))
  return shape_ids, colour_ids, sizes, positions


def captions(rng: np.random.Generator | int, shape_ids, colour_ids) -> list[str]:
  """One caption per image, its template drawn from `CAPTIONS` and filled with the image's labels."""
  rng = _as_rng(rng)
  templates = rng.choice(len(CAPTIONS), size=len(shape_ids), p=_CAPTION_P)
  return [CAPTIONS[t][0].format(colour=COLOUR_NAMES[c], shape=SHAPES[k])
          for t, k, c in zip(templates, shape_ids, colour_ids)]


def sample(rng: np.random.Generator | int, n: int):
  """n fresh images of the world: (uint8 (n, 64, 64, 3), shape_ids, colour_ids, captions).

  Reproducible: the same Generator state or seed gives the same images and captions.
  """
  rng = _as_rng(rng)
  shape_ids, colour_ids, sizes, positions = sample_layout(rng, n)
  images = draw(shape_ids, colour_ids, sizes, positions)
  return images, shape_ids, colour_ids, captions(rng, shape_ids, colour_ids)


def retain_prompts(concepts) -> list[str]:
  """The world's prompts that name none of `concepts` (each one shape or one colour of the world): the single words
  and the "a {colour} {shape}" prompts an erasure of those concepts should leave as they are."""
  if not all(map(is_concept, concepts)):
    raise ValueError(f'{list(concepts)}: the shapes world knows which prompts to keep only for concepts that are one '
                     f'of its shapes or colours, {SHAPES + COLOUR_NAMES}.')
  named = [parse(c) for c in concepts]
  erased = {SHAPES[shape] if shape is not None else COLOUR_NAMES[colour] for shape, colour in named}
  words = [w for w in SHAPES + COLOUR_NAMES if w not in erased]
  return words + [p for p in PROMPTS if not erased & set(p.split())]


def naming(concept: str) -> list[str]:
  """The world's "a {colour} {shape}" prompts that name `concept` (one shape or one colour): those an erasure of it
  is erased from with erase.erase_from='auto'."""
  if not is_concept(concept):
    raise ValueError(f'{concept!r} is not one shape or one colour of the shapes world, {SHAPES + COLOUR_NAMES}.')
  return [p for p in PROMPTS if concept in p.split()]


def is_concept(prompt: str) -> bool:
  """Whether `prompt` names exactly one concept of the world: a shape or a colour, not both, not neither."""
  shape, colour = parse(prompt)
  return (shape is None) != (colour is None)


def parse(prompt: str) -> tuple[int | None, int | None]:
  """(shape_id, colour_id) that a prompt names, None where it names none: what a generation should show."""
  words = re.findall(r'[a-z]+', prompt.lower())
  shape = next((SHAPES.index(w) for w in words if w in SHAPES), None)
  colour = next((COLOUR_NAMES.index(w) for w in words if w in COLOURS), None)
  return shape, colour
