"""Line charts as PNG, drawn with PIL (no plotting library): a run's loss and its probe's curves, side by side."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from esd_jax.files import atomic_path

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189))
_W, _H, _PAD = 420, 260, 44  # one panel, and the margin its axes' labels take


def _panel(title: str, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> Image.Image:
  image = Image.new('RGB', (_W, _H), 'white')
  draw = ImageDraw.Draw(image)
  draw.text((_PAD, 6), title, fill='black')
  points = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves.values()]
  xs = np.concatenate([x for x, _ in points]) if points else np.zeros(1)
  ys = np.concatenate([y[np.isfinite(y)] for _, y in points]) if points else np.zeros(1)
  x0, x1 = float(xs.min()), float(max(xs.max(), xs.min() + 1))
  y0, y1 = float(min(ys.min(initial=0), 0)), float(max(ys.max(initial=1e-12), 1e-12))
  left, top, right, bottom = _PAD, 22, _W - 12, _H - 28
  draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
  for value, y in ((y1, top), (y0, bottom)):
    draw.text((4, y - 6), f'{value:.3g}', fill='black')
  draw.text((left, bottom + 6), f'{x0:g}', fill='black')
  draw.text((right - 40, bottom + 6), f'{x1:g}', fill='black')
  for k, (name, (x, y)) in enumerate(zip(curves, points)):
    colour = _COLOURS[k % len(_COLOURS)]
    u = left + (x - x0) / (x1 - x0) * (right - left)
    v = bottom - (y - y0) / (y1 - y0) * (bottom - top)
    line = [(float(a), float(b)) for a, b in zip(u, v) if np.isfinite(b)]
    if len(line) > 1:
      draw.line(line, fill=colour, width=2)
    elif line:
      draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill=colour)
    draw.text((right - 150, top + 4 + 12 * k), name, fill=colour)
  return image


def save_curves(path: str | os.PathLike, panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]
                ) -> Path:
  """One panel per entry of `panels` ({title: {curve name: (x, y)}}), left to right, as a PNG."""
  images = [_panel(title, curves) for title, curves in panels.items()]
  sheet = Image.new('RGB', (_W * len(images), _H), 'white')
  for k, image in enumerate(images):
    sheet.paste(image, (_W * k, 0))
  with atomic_path(path) as tmp:
    sheet.save(tmp, format='PNG')
  return Path(path)


def training_curves(metrics: str | os.PathLike, out: str | os.PathLike) -> Path:
  """workdir/metrics.jsonl as a PNG: the loss (a running mean over 20 iterations beside the raw values) and, when
  the run probed its model (erase until), the probe's numbers over the iterations."""
  records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
  steps = [r for r in records if 'loss' in r and 'event' not in r]
  x = np.asarray([r['step'] for r in steps], float)
  loss = np.asarray([np.mean(r['loss']) for r in steps], float)
  window = min(20, max(len(loss), 1))
  smooth = np.convolve(loss, np.ones(window) / window, mode='valid') if len(loss) else loss
  panels = {'loss': {'loss': (x, loss), f'mean of {window}': (x[window - 1:], smooth)}}
  probes = [r for r in records if r.get('event') == 'probe']
  if probes:
    names = [k for k in probes[0] if k not in ('event', 'step', 'met', 'seconds', 'score', 'seeds')]
    panels['probe'] = {k: ([r['step'] for r in probes], [r[k] for r in probes]) for k in names}
  return save_curves(out, panels)
