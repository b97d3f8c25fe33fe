"""The shapes-world erasures end to end, shortened only in how many images measure them: erase "circle" from
the shipped model with the default recipe, and "red" with configs/shapes_colour.py (ESD-x), check that the concept
is gone (issue 14's judge: an image judged 'none' keeps nothing), and that the exported diffusers pipeline, run by
diffusers in PyTorch, draws what our erased model draws.

What these recipes cost the other concepts is not asserted here: the judge that can say "none" measures it far
beyond issue 4's 10 points (README "The default job": triangle −75 points, green −54 after the circle erasure, 16
seeds), which issue 14's procedure is measured against (benchmarks/any_concept.py)."""

import json

import numpy as np
import pytest

from configs.default import get_config
from esd_jax import commands
from esd_jax.shapes_world.measure import Sampling, generate_diffusers, generate_jax, load_judge, score
from esd_jax.shapes_world.world import COLOUR_NAMES

SEEDS = 8  # the README's numbers use 64


@pytest.mark.parity
def test_default_erasure_erases_circles_in_jax_and_in_diffusers(tmp_path):
  config = get_config()
  config.workdir = str(tmp_path)
  config.evaluate.seeds = SEEDS
  result = commands.erase(config)
  report = json.loads((tmp_path / 'report.json').read_text())
  (summary,) = report['models']['erased']['summary']
  assert summary['concept'] == 'circle' and summary['base_rate'] >= 0.9
  assert summary['erased_rate'] <= 0.10, summary
  assert summary['worst_other_shape']['name'] and summary['worst_other_colour']['name']  # both kinds measured
  assert (tmp_path / 'erasure.png').stat().st_size > 0

  # The exported pipeline in diffusers/PyTorch draws the same images, so it meets the same criteria.
  prompts = ['a red circle', 'a blue circle', 'a green square']
  seeds, sampling = list(range(2)), Sampling()
  theirs = generate_diffusers(tmp_path / 'erased' / 'pipeline', prompts, seeds, sampling, latent_shape=(8, 8, 4))
  from convert.erased import erased_pipeline
  ours = generate_jax(erased_pipeline(result.pipe, result.trained), prompts, seeds, sampling)
  assert np.abs(ours - theirs).max() <= 2 / 255
  judge = load_judge()
  assert score(judge, prompts, theirs) == score(judge, prompts, ours)


@pytest.mark.parity
def test_colour_erasure_with_esd_x_erases_red(tmp_path):
  from configs.shapes_colour import get_config as colour_config
  from convert.erased import erased_pipeline
  from esd_jax.shapes_world.world import PROMPTS, parse
  from esd_jax.train import run_erasure

  config = colour_config('red')
  config.workdir = str(tmp_path)
  result = run_erasure(config, progress=False)
  # Only the erased model is measured: the original shows the prompted shape in 98.5 % and colour in 99.9 % of
  # images (README, 64 seeds).
  report = score(load_judge(), PROMPTS,
                 generate_jax(erased_pipeline(result.pipe, result.trained), PROMPTS, range(SEEDS), Sampling()))
  naming = lambda colour: [report[p] for p in PROMPTS if parse(p)[1] == COLOUR_NAMES.index(colour)]
  assert np.mean([r['colour'] for r in naming('red')]) <= 0.10, report  # 'colour': showing the prompted one
  assert np.mean([r['shape'] for r in naming('red')]) >= 0.85, report
