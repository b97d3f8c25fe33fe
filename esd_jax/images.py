"""PNG output: single images and labelled grids, written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from esd_jax.files import atomic_path

_PAD = 4


def to_uint8(images) -> np.ndarray:
  """Floats in [0, 1] → uint8, rounded as diffusers' numpy_to_pil does."""
  return (np.clip(np.asarray(images, np.float32), 0, 1) * 255).round().astype(np.uint8)


def save_png(image, path: str | os.PathLike) -> None:
  with atomic_path(path) as tmp:
    Image.fromarray(to_uint8(image)).save(tmp, format='PNG')


def grid(rows: Sequence[Sequence[np.ndarray]], *, row_labels: Sequence[str] = (),
         col_labels: Sequence[str] = (), scale: int = 1) -> Image.Image:
  """A grid of equally sized images with optional labels left of each row and above each column.

  `scale` enlarges small images (nearest neighbour) so that 64-pixel samples stay legible.
  """
  if not rows or not rows[0]:
    raise ValueError('grid: no images.')
  font = ImageFont.load_default()
  h, w = rows[0][0].shape[0] * scale, rows[0][0].shape[1] * scale
  text_w = max([int(font.getlength(t)) for t in row_labels] or [0])
  left = text_w + 2 * _PAD if row_labels else 0
  top = 16 if col_labels else 0
  ncols = max(len(r) for r in rows)
  canvas = Image.new('RGB', (left + ncols * (w + _PAD) + _PAD, top + len(rows) * (h + _PAD) + _PAD), 'white')
  draw = ImageDraw.Draw(canvas)
  for j, label in enumerate(col_labels):
    draw.text((left + _PAD + j * (w + _PAD), 2), label, fill='black', font=font)
  for i, row in enumerate(rows):
    y = top + _PAD + i * (h + _PAD)
    if i < len(row_labels):
      draw.text((_PAD, y + h // 2 - 6), row_labels[i], fill='black', font=font)
    for j, image in enumerate(row):
      tile = Image.fromarray(to_uint8(image)).resize((w, h), Image.NEAREST)
      canvas.paste(tile, (left + _PAD + j * (w + _PAD), y))
  return canvas


def save_grid(path: str | os.PathLike, rows, **kwargs) -> Path:
  with atomic_path(path) as tmp:
    grid(rows, **kwargs).save(tmp, format='PNG')
  return Path(path)
