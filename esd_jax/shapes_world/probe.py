"""Erase-until on the shapes world: the probe that tells a run when its concept is gone and the rest still there.

Every `probe.every` iterations the run (train.Probe) hands the trained tensors here; the model with them laid over
the base draws the world's 16 "a {colour} {shape}" prompts from a few seeds of its own (1000…, never the
evaluation's 0…n-1), in one jitted batch, and the classifier says what each image shows. The numbers are those of
the report (measure.erasure_summary) against the original model's images from the same noise, drawn once:

  shown       the share of the erased concept's prompts whose images still show it (the worst concept's)
  worst_drop  the largest drop of any other shape's or colour's accuracy, in points (share) of its prompts
              (shape_drop and colour_drop: the largest of each kind)

The criteria hold when shown ≤ max_shown and worst_drop ≤ max_drop. With `confirm_seeds` > 0 a reading that meets
them is confirmed before the run stops: the same model draws confirm_seeds more seeds (after the probe's) with
confirm_steps DDIM steps (the probe's seeds too when those differ from its steps), and the criteria must hold again on
all the images together, with worst_drop ≤ confirm_max_drop (the reading logged is the pooled one, `seeds` says how
many). The first reading under the thresholds is where the probe's chance error leans the run's way; confirming it
on more images is what keeps the run from stopping on a lucky draw. A reading with the concept gone (shown ≤
max_shown) settles the run (train.Settle: its learning rate and λ changed). The best checkpoint is the one with the
lowest shown + max(worst_drop, 0): a point of the concept left weighs as much as a point of another concept lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from esd_jax.errors import RunError
from esd_jax.generate import text_to_image_models
from esd_jax.pipeline import StableDiffusion
from esd_jax.shapes_world import measure, world
from esd_jax.train import Probe, Reading, Settle

FIRST_SEED = 1000  # probe seeds are FIRST_SEED…: none is an evaluation seed
MIN_ORIGINAL = 0.9  # the original model's shape and colour accuracy the probe must see


@dataclasses.dataclass
class ShapesProbe:
  pipe: StableDiffusion
  judge: object
  concepts: Sequence[str]
  settings: ml_collections.ConfigDict
  # The original model's images (prompts, seeds, …) and the judge's reports of their first seeds, by DDIM steps.
  original: dict[int, np.ndarray] = dataclasses.field(init=False, default_factory=dict)
  _judged: dict[tuple[int, int], dict] = dataclasses.field(init=False, default_factory=dict)

  def __post_init__(self):
    # With too few sampler steps every image is a blob: erased and original alike show nothing, and the criteria
    # would hold from the first reading. The probe must first see the original model draw the world.
    report = self._original_report(self.settings.seeds, self.settings.steps)
    seen = {key: measure.mean_rate(report, key, world.PROMPTS) for key in ('shape', 'colour')}
    if min(seen.values()) < MIN_ORIGINAL:
      raise RunError(f'The probe sees the original model draw the prompted shape in {seen["shape"]:.0%} and colour in '
                     f'{seen["colour"]:.0%} of its images ({self.settings.seeds} seeds × {self.settings.steps} DDIM '
                     f'steps); it needs {MIN_ORIGINAL:.0%} of both to tell an erasure from noise: raise '
                     '--config.probe.steps (25 by default) or --config.probe.seeds.')

  def draw(self, overlay: dict[str, jax.Array], first: int, count: int, steps: int) -> np.ndarray:
    """(prompts, seeds, …) images of probe seeds first … first + count − 1 (after FIRST_SEED) in `steps` DDIM steps."""
    seeds = range(FIRST_SEED + first, FIRST_SEED + first + count)
    images = text_to_image_models(self.pipe, [overlay], world.PROMPTS, seeds, num_inference_steps=steps,
                                  guidance_scale=self.settings.guidance_scale)[0]
    return np.swapaxes(images, 0, 1)

  def _original_report(self, seeds: int, steps: int) -> dict[str, dict]:
    """The judge's report of the original model's first `seeds` probe seeds at `steps`, drawn and judged once."""
    if (seeds, steps) not in self._judged:
      drawn = self.original.get(steps)
      have = 0 if drawn is None else drawn.shape[1]
      if have < seeds:
        more = self.draw({}, have, seeds - have, steps)
        self.original[steps] = drawn = more if drawn is None else np.concatenate([drawn, more], axis=1)
      self._judged[seeds, steps] = measure.score(self.judge, world.PROMPTS, drawn[:, :seeds])
    return self._judged[seeds, steps]

  def reading(self, images: np.ndarray, steps: int, max_drop: float) -> Reading:
    """The reading of images (prompts, seeds, …) of the probe's first seeds drawn with `steps`, against the
    original's from those; met with worst_drop ≤ max_drop."""
    base, report = self._original_report(images.shape[1], steps), measure.score(self.judge, world.PROMPTS, images)
    summaries = [measure.erasure_summary(base, report, c) for c in self.concepts]
    shown = max(s['erased_rate'] for s in summaries)
    worst_drop = max(s['max_other_drop'] for s in summaries)
    drops = {f'{kind}_drop': max(s[f'worst_other_{kind}']['drop'] for s in summaries) for kind in ('shape', 'colour')}
    return Reading({'shown': shown, 'worst_drop': worst_drop, **drops, 'seeds': images.shape[1]},
                   met=shown <= self.settings.max_shown and worst_drop <= max_drop,
                   score=shown + max(worst_drop, 0.0), concept_gone=shown <= self.settings.max_shown)

  def __call__(self, trained: dict[str, jax.Array]) -> Reading:
    settings = self.settings
    images = self.draw(trained, 0, settings.seeds, settings.steps)
    first = self.reading(images, settings.steps, settings.max_drop)
    return self.confirmed(trained, images) if first.met and settings.confirm_seeds else first

  def confirmed(self, trained: dict[str, jax.Array], images: np.ndarray | None = None) -> Reading:
    """The reading of the probe's seeds and confirm_seeds more, pooled, at confirm_steps. `images`, the probe's
    seeds already drawn at its own steps, are reused when those are the confirmation's."""
    settings = self.settings
    reuse = images is not None and settings.confirm_steps == settings.steps
    first = images.shape[1] if reuse else 0
    more = self.draw(trained, first, settings.seeds + settings.confirm_seeds - first, settings.confirm_steps)
    pooled = np.concatenate([images, more], axis=1) if reuse else more
    return self.reading(pooled, settings.confirm_steps, settings.confirm_max_drop)


def shapes_probe(judge, concepts: Sequence[str], settings: ml_collections.ConfigDict):
  """train.run_erasure's `probe`: given the loaded pipeline, the Probe of `concepts` (each one world concept)."""
  for concept in concepts:
    if not world.is_concept(concept):
      raise ValueError(f'probe: {concept!r} is not one shape or one colour of the shapes world; the shapes probe '
                       f'measures erasing one of {world.SHAPES + world.COLOUR_NAMES}.')
  settle = Settle(settings.settle_learning_rate, settings.settle_preserve_weight)
  return lambda pipe: Probe(settings.every, ShapesProbe(pipe, judge, list(concepts), settings), settle)
