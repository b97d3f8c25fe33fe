"""The Test tab's engine: the server's base model, loaded once, and the original beside each chosen erased model,
generated together (commands.compare_images: one jitted batch over models, seeds and prompts, each seed the noise
`generate` draws for it), with the shapes-world classifier's verdict on every image where one is configured.
"""

from __future__ import annotations

import threading
from pathlib import Path

import ml_collections
import numpy as np

from esd_jax import commands, images
from esd_jax.app.workspace import ErasedModel
from esd_jax.loading import load_model

DISPLAY_SIZE = 192  # small models' images are enlarged (nearest neighbour) to about this many pixels


class Studio:
  """The base pipeline and the classifier of a server, each loaded on first use and kept."""

  def __init__(self, base: ml_collections.ConfigDict):
    self.base = base
    self._lock = threading.Lock()
    self._pipe = None
    self._judge = None

  def pipe(self):
    with self._lock:
      if self._pipe is None:
        self._pipe = load_model(self.base)
      return self._pipe

  def judge(self):
    """The classifier evaluate.classifier names ('' for none: a model outside the shapes world)."""
    if not self.base.evaluate.classifier:
      return None
    with self._lock:
      if self._judge is None:
        from esd_jax.shapes_world.measure import load_judge
        self._judge = load_judge(self.base.evaluate.classifier)
      return self._judge

  def check_weights(self, path: str | Path) -> None:
    """Reads ESD weights as `export` and `compare` do and lays them over the base UNet: an error says why they
    do not fit (another architecture, shapes, a pickle with more than tensors)."""
    from convert.erased import erased_pipeline
    from convert.esd_weights import read_esd_weights
    erased_pipeline(self.pipe(), read_esd_weights(path))

  def compare(self, settings: ml_collections.ConfigDict, models: list[ErasedModel], grid: Path
              ) -> list[tuple[np.ndarray, str]]:
    """The original and each of `models` for settings.prompts × settings.seeds: (image, caption) in reading
    order, a row per prompt and seed with the models side by side; the labelled grid is written to `grid`."""
    from convert.esd_weights import read_esd_weights

    pipe = self.pipe()
    names = ['original', *(m.name for m in models)]
    generated = commands.compare_images(
        pipe, {'original': None, **{m.name: read_esd_weights(m.weights) for m in models}}, settings)
    prompts, seeds = list(settings.prompts), list(settings.seeds)
    commands.compare_grid(grid, names, generated, prompts, seeds)
    verdicts = self._verdicts(generated)
    gallery = []
    for p, prompt in enumerate(prompts):
      for s, seed in enumerate(seeds):
        for m, name in enumerate(names):
          # What the classifier sees first: a narrow thumbnail cuts its caption's end.
          caption = (f'sees {verdicts[m, s, p]} · ' if verdicts is not None else '') + f'{name} · seed {seed}'
          caption += f' · {prompt}' if len(prompts) > 1 else ''
          gallery.append((_enlarged(generated[m, s, p]), caption))
    return gallery

  def _verdicts(self, generated: np.ndarray) -> np.ndarray | None:
    """What the classifier sees in each image ("red circle"), shaped as the images (without the pixels)."""
    judge = self.judge()
    if judge is None:
      return None
    from esd_jax.shapes_world import classifier
    shape_ids, colour_ids, _, _ = classifier.predict(judge, generated.reshape(-1, *generated.shape[-3:]))
    # Ids index the labels, 'none' included ("none circle": a circle in no clear colour).
    said = [f'{classifier.COLOUR_LABELS[c]} {classifier.SHAPE_LABELS[s]}' for s, c in zip(shape_ids, colour_ids)]
    return np.asarray(said, dtype=object).reshape(generated.shape[:3])


def _enlarged(image: np.ndarray) -> np.ndarray:
  factor = max(1, DISPLAY_SIZE // image.shape[0])
  return np.repeat(np.repeat(images.to_uint8(image), factor, axis=0), factor, axis=1)
