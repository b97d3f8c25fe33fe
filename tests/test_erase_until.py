"""Erase until (train.Probe): the loop measures its model, stops when the criteria hold, keeps the best it measured,
and resumes knowing both; the retain prompts erase.preserve resolves to."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.default import get_config
from esd_jax.concepts import Concept
from esd_jax.commands import with_world_prompts
from esd_jax.errors import RunError
from esd_jax.validate import ConfigError
from esd_jax.models.state_dict import stored
from esd_jax.shapes_world import world
from esd_jax.train import Probe, Reading, Settle, concept_list, retain_prompts, run_erasure


def _config(model, workdir, iterations):
  config = get_config()
  config.model, config.workdir = str(model), str(workdir)
  config.erase.method, config.erase.ddim_steps = 'esd-x', 4
  config.train.update({'iterations': iterations, 'checkpoint_every': 100, 'learning_rate': 1e-3})
  return config


class Scripted:
  """A probe whose readings are given per iteration (what a judge would say), recording what it was shown: the
  loop's mechanics are under test here, the shapes world's judge in the erasure tests."""

  def __init__(self, scores: dict[int, float], met_at: int | None = None, *, every: int = 2,
               settle: Settle = Settle()):
    self.scores, self.met_at, self.seen, self.calls = scores, met_at, {}, 0
    self.every, self.settle = every, settle

  def __call__(self, pipe):
    def measure(trained):
      self.calls += 1
      step = sorted(self.scores)[self.calls - 1]
      self.seen[step] = {k: np.asarray(jax.device_get(v)) for k, v in trained.items()}
      return Reading({'shown': self.scores[step]}, met=step == self.met_at, score=self.scores[step],
                     concept_gone=self.scores[step] == 0)
    return Probe(self.every, measure, self.settle)


def _probes(workdir):
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r for r in lines if r.get('event') == 'probe'], [r['step'] for r in lines if 'event' not in r]


def test_stops_when_the_criteria_hold_and_a_rerun_trains_no_more(model, tmp_path):
  probe = Scripted({2: 0.9, 4: 0.5, 6: 0.0}, met_at=6)
  result = run_erasure(_config(model, tmp_path, 20), probe=probe)
  probes, steps = _probes(tmp_path)
  assert [p['step'] for p in probes] == [2, 4, 6] and steps == list(range(1, 7))
  assert probes[-1]['met'] and json.loads((tmp_path / 'probe' / 'best.json').read_text())['step'] == 6
  assert result.metadata['probe']['step'] == 6
  assert all(np.array_equal(result.trained[k], stored(probe.seen[6][k])) for k in result.trained)
  again = run_erasure(_config(model, tmp_path, 20), probe=Scripted({}))
  assert _probes(tmp_path)[1] == list(range(1, 7))  # nothing more trained, nothing measured
  assert all(np.array_equal(again.trained[k], result.trained[k]) for k in result.trained)


def test_never_met_exports_the_best_measured_and_a_resume_remembers_it(model, tmp_path):
  first = Scripted({2: 0.6, 4: 0.2, 6: 0.4})
  run_erasure(_config(model, tmp_path, 6), probe=first)
  best = load_file(tmp_path / 'probe' / 'best.safetensors')
  assert all(np.array_equal(best[k], stored(first.seen[4][k])) for k in best)
  # Extended to 10 iterations: step 8 scores worse than step 4's, step 10 better.
  second = Scripted({8: 0.3, 10: 0.1})
  result = run_erasure(_config(model, tmp_path, 10), probe=second)
  assert result.metadata['probe']['step'] == 10
  assert all(np.array_equal(result.trained[k], stored(second.seen[10][k])) for k in result.trained)
  assert not any(np.array_equal(result.trained[k], stored(first.seen[4][k])) for k in result.trained)


def test_a_fresh_run_ignores_a_probe_folder_left_behind(model, tmp_path):
  run_erasure(_config(model, tmp_path, 2), probe=Scripted({2: 0.0}, met_at=2))
  for path in (tmp_path / 'checkpoints', tmp_path / 'metrics.jsonl'):
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  (tmp_path / 'probe' / 'settled.json').write_text('{"step": 2}')  # as if the earlier run had settled
  probe = Scripted({2: 0.5, 4: 0.7})
  result = run_erasure(_config(model, tmp_path, 4), probe=probe)
  assert result.metadata['probe']['step'] == 2 and not result.metadata['probe']['met']
  assert not (tmp_path / 'probe' / 'settled.json').exists()


def test_a_reading_with_the_concept_gone_settles_the_learning_rate_for_the_rest_of_the_run(model, tmp_path):
  runs = {}
  half = Settle(learning_rate=0.5)
  for name, settle, iterations in (('plain', Settle(), 3), ('settled', half, 3), ('resumed', half, 2)):
    runs[name] = Scripted({1: 0.5, 2: 0.0, 3: 0.0}, met_at=3, every=1, settle=settle)
    run_erasure(_config(model, tmp_path / name, iterations), probe=runs[name])
  run_erasure(_config(model, tmp_path / 'resumed', 3), probe=Scripted({3: 0.0}, met_at=3, every=1, settle=half))
  step = lambda name, i, k: runs[name].seen[i][k].astype(np.float64) - runs[name].seen[i - 1][k]
  for k in runs['plain'].seen[1]:
    np.testing.assert_array_equal(step('settled', 2, k), step('plain', 2, k))  # the reading at 2 settles
    # Iteration 3 starts from the same state, takes the same gradient and Adam moments: half the step.
    # (to the float32 rounding of the weights the steps are taken from: 1e-8)
    np.testing.assert_allclose(step('settled', 3, k), 0.5 * step('plain', 3, k), rtol=1e-4, atol=2e-8)
  resumed = load_file(tmp_path / 'resumed' / 'probe' / 'best.safetensors')
  assert all(np.array_equal(resumed[k], stored(runs['settled'].seen[3][k])) for k in resumed)
  events = [json.loads(line) for line in (tmp_path / 'settled' / 'metrics.jsonl').read_text().splitlines()]
  assert [e for e in events if e.get('event') == 'settled'] == [
      {'event': 'settled', 'step': 2, 'learning_rate': 0.5, 'preserve_weight': 1.0}]
  assert json.loads((tmp_path / 'resumed' / 'probe' / 'settled.json').read_text()) == {'step': 2}


def test_retain_prompts():
  config = get_config()
  with config.ignore_type():  # the field holds a tuple of prompts, or 'auto'
    config.erase.preserve = 'auto'
  with pytest.raises(RunError, match="esd_jax.commands fills in"):
    retain_prompts(config.erase, _concepts('circle'))
  auto = with_world_prompts(config).erase.preserve
  assert 'circle' not in auto and not any('circle' in p for p in auto)
  assert set(auto) >= {'square', 'red', 'a red square', 'a yellow cross'} and len(auto) == 3 + 4 + 12
  assert world.retain_prompts(['circle', 'red']) == [p for p in auto if 'red' not in p.split()]
  config.erase.concepts = ('a dog',)
  with pytest.raises(ConfigError, match="list the prompts to preserve"):
    with_world_prompts(config)
  with config.ignore_type():
    config.erase.preserve = ('a house', 'a tree')
  assert retain_prompts(config.erase, _concepts('a dog')) == ['a house', 'a tree']


def test_erase_from_auto_erases_each_concept_from_the_world_prompts_naming_it():
  config = get_config()
  with config.ignore_type():
    config.erase.erase_from = 'auto'
  config.erase.concepts = ('square', 'red')
  with pytest.raises(RunError, match='esd_jax.commands fills in'):
    concept_list(config.erase)
  erase = with_world_prompts(config).erase
  assert erase.erase_from == ('a red square', 'a green square', 'a blue square', 'a yellow square', 'a red circle',
                              'a red square', 'a red triangle', 'a red cross')
  assert erase.concepts == ('square',) * 4 + ('red',) * 4
  assert [c.prompt for c in concept_list(erase)] == list(erase.concepts)
  config.erase.concepts = ('a red square',)  # two concepts of the world in one prompt
  with pytest.raises(ConfigError, match="not one shape or one colour.*--config.erase.erase_from=''"):
    with_world_prompts(config)
  config.erase.concepts_file = 'concepts.csv'
  with pytest.raises(ConfigError, match='set it there'):
    with_world_prompts(config)


def _concepts(prompt):
  return [Concept(prompt)]


@pytest.mark.parity
def test_the_any_concept_procedure_end_to_end_on_the_shapes_world(tmp_path):
  """Issue 14's one command for any concept (configs/any_concept.py) on "circle", with a shortened probe (2 seeds)
  and final measurement (4 seeds): every probe reading in metrics.jsonl, the run stops at the first that meets the
  criteria and exports the model measured then, which the report finds erased with the other concepts kept."""
  from configs.any_concept import get_config as any_concept
  from esd_jax import commands
  from esd_jax.shapes_world.measure import load_judge
  from esd_jax.shapes_world.probe import shapes_probe
  config = any_concept()
  config.workdir = str(tmp_path)
  config.erase.concepts = ('circle',)
  config.probe.seeds = 2
  config.probe.confirm_seeds = 2
  config.evaluate.seeds = 4
  config.export.formats = ('trained',)
  result = commands.erase(config)
  probes, steps = _probes(tmp_path)
  every = config.probe.every
  assert [p['step'] for p in probes] == list(range(every, steps[-1] + 1, every)) and probes[0]['shown'] > 0.5
  # A reading that met the criteria on its 2 seeds was confirmed on 2 more: the one logged is on all 4 (one that
  # failed its confirmation too).
  assert probes[-1]['seeds'] == 4 and {p['seeds'] for p in probes} <= {2, 4}, probes
  # Settled (if at all) once, at the first reading with the circle gone that did not meet the criteria.
  events = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  gone = [p['step'] for p in probes if p['shown'] <= config.probe.max_shown and not p['met']]
  assert [e['step'] for e in events if e.get('event') == 'settled'] == gone[:1]
  best = json.loads((tmp_path / 'probe' / 'best.json').read_text())
  assert best['met'] and probes[-1]['met'] and result.metadata['probe'] == best
  # Stopped at the first reading that met the criteria, and exported that model.
  assert steps[-1] == best['step'] < config.train.iterations and not any(p['met'] for p in probes[:-1])
  assert best['shown'] <= config.probe.max_shown and best['worst_drop'] <= config.probe.max_drop
  saved = load_file(tmp_path / 'probe' / 'best.safetensors')
  exported = load_file(tmp_path / 'erased' / 'unet_trained.safetensors')
  assert saved.keys() == exported.keys() and all(np.array_equal(exported[k], saved[k]) for k in saved)
  assert all('.attn2.' in k for k in saved)  # ESD-x: cross-attention only
  (summary,) = json.loads((tmp_path / 'report.json').read_text())['models']['erased']['summary']
  # 16 images of the circle's prompts and of each other shape's, 12 of each colour's (on the prompts without the
  # circle): at most one image of any of them.
  assert summary['erased_rate'] <= 1 / 16 and summary['max_other_drop'] <= 1 / 12, summary
  assert (tmp_path / 'training.png').stat().st_size > 0
  # A probe too coarse to see the original draw the world (2 DDIM steps: blobs) is refused, not met vacuously.
  coarse = config.probe.copy_and_resolve_references()
  coarse.steps = 2
  with pytest.raises(RunError, match='raise --config.probe.steps'):
    shapes_probe(load_judge(), ['circle'], coarse)(result.pipe)


def test_the_shapes_probe_confirms_at_its_own_steps_and_bound():
  """The confirmation (probe.confirm_*) draws the probe's seeds and confirm_seeds more at confirm_steps, reusing the
  probe's images only when the steps are the same, and the pooled reading is met against confirm_max_drop."""
  from configs.any_concept import get_config as any_concept
  from esd_jax.loading import load_model
  from esd_jax.shapes_world.measure import load_judge
  from esd_jax.shapes_world.probe import ShapesProbe

  config = any_concept()
  settings = config.probe.copy_and_resolve_references()
  settings.update(seeds=2, confirm_seeds=1, confirm_steps=10, confirm_max_drop=0.2)
  probe = ShapesProbe(load_model(config), load_judge(), ['circle'], settings)
  calls, draw = [], probe.draw
  probe.draw = lambda overlay, first, count, steps: calls.append((bool(overlay), first, count, steps)) or draw(
      overlay, first, count, steps)
  images = probe.draw({}, 0, 2, settings.steps)
  calls.clear()
  reading = probe.confirmed({}, images)  # the original model, read against itself
  assert calls == [(False, 0, 3, 10)] * 2 and probe.original[10].shape[1] == 3  # the model's draw, the original's
  assert reading.numbers['seeds'] == 3 and reading.numbers['worst_drop'] == 0 and not reading.met  # circles shown
  probe.settings.confirm_steps = settings.steps
  calls.clear()
  probe.confirmed({}, images)
  assert calls == [(False, 2, 1, settings.steps)] * 2  # the model's third seed, then the original's
  # An erasure: every circle prompt's images blank, and one green square (one of square's 8 images: 12.5 points, one
  # of green's 6 on the prompts without a circle: 16.7).
  erased = probe.original[settings.steps][:, :2].copy()
  erased[[world.PROMPTS.index(p) for p in world.PROMPTS if 'circle' in p]] = 1.0
  erased[world.PROMPTS.index('a green square'), 0] = 1.0
  numbers = probe.reading(erased, settings.steps, 0.2).numbers
  assert numbers['shown'] == 0 and numbers['shape_drop'] == 1 / 8 and numbers['worst_drop'] == pytest.approx(1 / 6)
  assert probe.reading(erased, settings.steps, 0.17).met and not probe.reading(erased, settings.steps, 0.16).met
