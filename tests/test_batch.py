"""Batch erasure: concept files, N separate models in one vmapped run, several concepts per step, resume,
one model stopped for a non-finite loss, the per-model export and its manifest."""

import functools
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.default import get_config
from esd_jax import commands, esd
from esd_jax.concepts import Concept, ConceptError, read_concepts
from esd_jax.models.state_dict import split_flat, state_dict
from esd_jax.tiny import SCHEDULER
from esd_jax.errors import RunError
from esd_jax.loading import load_model
from esd_jax.train import encode_concepts, model_schedules, run_erasure

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ('a cat', 'a dog', 'a car')


def _config(model, workdir, concepts=CONCEPTS, **fields):
  config = get_config()
  config.model, config.workdir = str(model), str(workdir)
  config.erase.concepts, config.erase.method, config.erase.ddim_steps = concepts, 'esd-x', 4
  config.train.update(iterations=10, checkpoint_every=5, learning_rate=1e-3)
  config.evaluate.classifier, config.export.formats = '', ('trained',)
  for key, value in fields.items():
    section, name = key.split('__')
    config[section][name] = value
  return config


def _flat(trained, index=None):
  pick = (lambda v: v) if index is None else (lambda v: v[index])
  return np.concatenate([np.ravel(np.asarray(pick(trained[k]))) for k in sorted(trained)])


def test_concept_files(tmp_path):
  (tmp_path / 'c.txt').write_text('# artists\nVan Gogh\n\n  Claude Monet  \n')
  assert read_concepts(tmp_path / 'c.txt') == [Concept('Van Gogh'), Concept('Claude Monet')]
  (tmp_path / 'c.csv').write_text('concept,erase_from,negative_guidance\ncircle,,\ncar,a red car,2.5\n')
  assert read_concepts(tmp_path / 'c.csv') == [Concept('circle'), Concept('car', 'a red car', 2.5)]
  (tmp_path / 'c.json').write_text(json.dumps(['red', {'concept': 'cross', 'negative_guidance': 3,
                                                       'learning_rate': 2e-4, 'iterations': 150}]))
  assert read_concepts(tmp_path / 'c.json') == [Concept('red'), Concept('cross', '', 3.0, 2e-4, 150)]
  bad = {'missing.txt': None, 'empty.txt': '# nothing\n', 'noheader.csv': 'prompt\ncat\n',
         'field.json': '[{"concept": "cat", "eta": 2}]', 'eta.csv': 'concept,negative_guidance\ncat,lots\n',
         'blank.json': '[""]', 'broken.json': '[1,', 'rate.csv': 'concept,learning_rate\ncat,-1e-4\n',
         'count.csv': 'concept,iterations\ncat,2.5\n'}
  messages = {'missing.txt': 'no such concepts file', 'empty.txt': 'lists no concepts', 'noheader.csv': '"concept"',
              'field.json': "unknown field(s) ['eta']", 'eta.csv': 'not a finite number',
              'blank.json': 'the concept is empty', 'broken.json': 'not valid JSON',
              'rate.csv': "learning_rate '-1e-4' is not a positive number",
              'count.csv': "iterations '2.5' is not a positive whole number"}
  for name, text in bad.items():
    if text is not None:
      (tmp_path / name).write_text(text)
    with pytest.raises(ConceptError, match=re.escape(messages[name])):
      read_concepts(tmp_path / name)


def test_a_models_lines_agree_on_its_learning_rate_and_iterations():
  train = get_config().train
  lines = [Concept('cat', learning_rate=2e-4), Concept('cat', 'a cat on grass'), Concept('dog', iterations=50)]
  with pytest.raises(RunError, match=re.escape("The lines of concept 'cat' give different learning_rates")):
    model_schedules(lines, [[0, 1], [2]], train)
  with pytest.raises(RunError, match=re.escape('or train one model per concept (erase.separate_models=True)')):
    model_schedules(lines[1:], [[0, 1]], train)
  assert model_schedules(lines[1:], [[0], [1]], train) == ([train.learning_rate] * 2, [train.iterations, 50])


@pytest.mark.parametrize('convention', ['paper', 'diffusers-v2'])
def test_each_model_of_a_batch_equals_its_concept_trained_alone(model, tmp_path, convention):
  # Three models: the two "a dog" lines make one model, erased from both prompts (one drawn per iteration), with
  # its own learning rate and iteration count (the others: the run's 1e-3 and 10).
  lines = 'concept,erase_from,learning_rate,iterations\na cat,,,\na dog,a puppy,2e-3,7\na dog,a dog on grass,2e-3,7\na car,,,\n'
  (tmp_path / 'all.csv').write_text(lines)
  (tmp_path / 'dog.csv').write_text(''.join(lines.splitlines(keepends=True)[i] for i in (0, 2, 3)))
  batch = run_erasure(_config(model, tmp_path / 'batch', erase__concepts_file=str(tmp_path / 'all.csv'),
                        erase__separate_models=True, erase__convention=convention), progress=False)
  assert batch.groups == [[0], [1, 2], [3]] and all(v.shape[0] == 3 for v in batch.trained.values())
  assert batch.learning_rates == [1e-3, 2e-3, 1e-3] and batch.iterations == [10, 7, 10]
  # Model m of the batch draws from seed train.seed + m, as a run of its concept alone with that seed does.
  i = 1
  alone = run_erasure(_config(model, tmp_path / 'alone', erase__concepts_file=str(tmp_path / 'dog.csv'), train__seed=i,
                        erase__convention=convention), progress=False)
  want = _flat(alone.trained)
  assert np.linalg.norm(_flat(batch.trained, i) - want) / np.linalg.norm(want) <= 1e-5
  base = _flat({k: v for k, v in state_dict(batch.pipe.unet).items() if k in batch.trained})
  assert all(np.abs(_flat(batch.trained, m) - base).max() > 0 for m in range(3))  # every model moved
  if convention == 'paper':
    with pytest.raises(RunError, match='set erase.separate_models=True'):
      run_erasure(_config(model, tmp_path / 'one', train__shared_timesteps=True), progress=False)


def test_shared_timesteps_align_sampler_lengths_and_keep_each_models_noise():
  objective = esd.Objective(ddim_steps=50)
  scheduler = objective.scheduler(SCHEDULER)
  draws = jax.vmap(lambda seed: esd.draw(jax.random.key(seed), objective, scheduler, batch=1,
                                         latent_shape=(4, 4, 4), num_concepts=1))(jnp.arange(8))
  shared = esd.share_timesteps(draws)
  assert len(set(np.asarray(draws.step).tolist())) > 1  # own draws: different trajectory lengths
  assert (shared.step == draws.step[0]).all() and (shared.t == draws.t[0]).all()
  assert np.array_equal(shared.x_T, draws.x_T)


def test_several_concepts_per_step_average_their_losses(model):
  pipe = load_model(_config(model, '/unused'))
  layout, frozen = split_flat(pipe.unet)
  objective = esd.Objective(ddim_steps=4)
  scheduler = objective.scheduler(pipe.scheduler_config)
  prompts = encode_concepts(pipe, [Concept(c) for c in CONCEPTS], 1.0, height=None, width=None)
  trained = {k: v for k, v in frozen.items() if 'attn2' in k}
  draws = esd.draw(jax.random.key(0), objective, scheduler, batch=1, latent_shape=(16, 16, 4), num_concepts=3,
                   per_step=2)
  assert draws.x_T.shape == (2, 1, 16, 16, 4) and len(set(np.asarray(draws.concept).tolist())) == 2
  static = dict(layout=layout, objective=objective, scheduler=scheduler, prompts=prompts)
  loss = jax.jit(functools.partial(esd.esd_loss, **static))
  mean, _ = jax.jit(functools.partial(esd.mean_esd_loss, **static))(trained, frozen, draws=draws)
  each = [loss(trained, frozen, draws=jax.tree.map(lambda a: a[j], draws))[0] for j in range(2)]
  np.testing.assert_allclose(float(mean), float(jnp.mean(jnp.stack(each))), rtol=1e-6)
  assert float(each[0]) != float(each[1])


def test_resume_and_a_failing_model(model, tmp_path):
  concepts = tmp_path / 'concepts.csv'
  # η = 1e38 overflows the target of the second model: its loss is inf from the first step. The models are laid out
  # as in the test above (one of two erase_from lines), so the persistent compilation cache serves its step.
  concepts.write_text('concept,erase_from,negative_guidance\na cat,,\na dog,a puppy,1e38\na dog,a dog on grass,1e38\n'
                      'a car,,2\n')
  fields = dict(erase__concepts_file=str(concepts), erase__separate_models=True)
  full = commands.erase(_config(model, tmp_path / 'full', **fields))
  assert list(full.failed) == [1] and 'iteration 1' in full.failed[1]
  # The same run stopped after 5 iterations, then extended to 10 in the same workdir: it resumes at 5.
  run_erasure(_config(model, tmp_path / 'split', train__iterations=5, **fields), progress=False)
  resumed = commands.erase(_config(model, tmp_path / 'split', **fields))
  assert resumed.failed == full.failed
  assert all(np.array_equal(full.trained[k], resumed.trained[k]) for k in full.trained)
  manifest = json.loads((tmp_path / 'split' / 'erased' / 'manifest.json').read_text())
  status = {m['prompt']: m['status'] for m in manifest['models']}
  assert status == {'a cat': 'done', 'a dog': 'failed', 'a car': 'done'}
  for entry in manifest['models']:
    for relative, digest in entry.get('sha256', {}).items():
      path = tmp_path / 'split' / 'erased' / relative
      assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
  car = load_file(tmp_path / 'split' / 'erased' / '002-a_car' / 'unet_trained.safetensors')
  assert set(car) == set(full.trained) and all(np.array_equal(car[k], full.trained[k][2]) for k in car)
  assert not (tmp_path / 'split' / 'erased' / '001-a_dog').exists()


def test_concept_axis_sharded_over_eight_devices(model, tmp_path):
  def run(devices, concept, fsdp):
    out = tmp_path / f'{devices}.npz'
    subprocess.run([sys.executable, str(ROOT / 'tests' / 'sharded_erase.py'), str(devices), '1', str(fsdp),
                    str(model), str(tmp_path / f'w{devices}'), str(out), str(concept)], check=True, timeout=600,
                   cwd=tmp_path)
    return np.load(out)

  one, eight = run(1, 1, 1), run(8, 4, 2)
  keys = [k for k in one.files if '/' not in k]
  flat = lambda r: np.concatenate([np.ravel(r[k]) for k in keys])
  assert one[keys[0]].shape[0] == 4  # four models
  assert np.linalg.norm(flat(eight) - flat(one)) / np.linalg.norm(flat(one)) <= 1e-5
  for k in keys:  # each device holds one model's slice of every trained tensor (and no other model's)
    assert str(eight['spec/' + k]).replace('PartitionSpec', 'P').startswith("P('concept'")
    assert eight['shard_models/' + k] == 1
