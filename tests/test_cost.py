"""`plan` (esd_jax/cost.py): the abstract step is the step `erase` runs, and its accounting adds up."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from esd_jax import cost, esd, train
from esd_jax.cost import collective_bytes
from esd_jax.methods import summary
from esd_jax.models import build_abstract
from esd_jax.models.state_dict import param_shapes
from esd_jax.tiny import SCHEDULER, UNET
from tests.multihost import ROOT


def _config(model, workdir, **erase):
  config = default.get_config()
  config.model, config.workdir = str(model), str(workdir)
  config.erase.ddim_steps = 4
  config.erase.update(erase)
  return config


@pytest.mark.parametrize('erase', [dict(method='esd-x'), dict(method='esd-u', concepts=('a cat', 'a dog'),
                                                                  separate_models=True),
                                   dict(method='esd-x', adversarial=True, adversarial_steps=2, adversarial_tokens=3)])
def test_the_abstract_step_is_the_step_erase_runs(model, tmp_path, erase):
  # Lowered from a loaded model (train.set_up) and from configs alone (cost.abstract_setup): the same program.
  config = _config(model, tmp_path, **erase)
  plan = train.plan_run(config)
  build = train.separate_models if plan.separate else train.one_model
  _, concrete, _ = train.set_up(config, plan, None)
  lowered = [build(setup, plan, config.train).lower().as_text()
             for setup in (concrete, cost.abstract_setup(config, plan))]
  assert lowered[0] == lowered[1]


# XLA counts the sampler's loop body once, as in the shortest draw (one sampler step): 2 sampler forwards, 2 frozen,
# the student's forward and its backward, counted as two forwards (an upper bound: ESD-x needs no weight gradient
# below its first cross-attention), so XLA's count lies between 5 and 7 forwards' worth. With retain prompts every
# latent has a twin (one more frozen forward): between 9 and 13. Robust erasure's search loop, also counted once, adds
# a forward and a backward to the prompt (2 to 3 forwards; the analytic count leaves the small text encoder out):
# with both, between 11 and 16.
@pytest.mark.parametrize('erase, forwards', [
    (dict(), (5, 7)), (dict(preserve=('a house', 'a tree'), adversarial=True, adversarial_steps=1), (11, 16))])
def test_plan_adds_up_on_one_device(model, tmp_path, erase, forwards):
  config = _config(model, tmp_path, method='esd-x', **erase)
  result = cost.step_cost(config)
  shapes = param_shapes(build_abstract(json.loads((model / 'unet' / 'config.json').read_text())))
  trained = summary(shapes, 'esd-x')
  assert result['trained_parameters'] == trained['parameters']
  assert result['adversarial_steps'] == erase.get('adversarial_steps', 0)
  memory = result['per_device_bytes']
  assert memory['frozen_base'] == 4 * trained['total_parameters']
  assert memory['trained'] == 4 * trained['parameters'] and memory['adam'] >= trained['optimizer_state_bytes']
  # The arguments are the frozen base, the state and the small inputs (prompts, draws; robust erasure's text encoder
  # but its word-embedding table, which the search replaces with the prompts' embeddings: jit drops it unused); the
  # state is donated.
  held = memory['frozen_base'] + memory['trained'] + memory['adam']
  if erase.get('adversarial'):
    encoder = param_shapes(build_abstract(json.loads((model / 'text_encoder' / 'config.json').read_text())))
    held += 4 * sum(int(np.prod(s)) for k, s in encoder.items() if k != esd.TOKEN_EMBEDDING)
  assert held <= memory['arguments'] < 1.1 * held
  assert memory['total'] >= memory['arguments'] + memory['temporaries'] - memory['aliased']
  flops = result['flops']
  assert flops['sampler_steps'][0] == 1
  low, high = forwards
  assert low / high < flops['xla_per_iteration'] / flops['shortest_draw'] < 1.02
  assert flops['shortest_draw'] == high * flops['unet_forward']
  assert result['collective_bytes_per_device'] == dict.fromkeys(cost.COLLECTIVES, 0)


def test_plan_command_on_emulated_devices_shards_the_base(tmp_path):
  # main.py plan with plan.devices: 4 emulated CPU devices stand for the chips; fsdp over them splits every
  # tensor of at least min_shard_size elements, and the step gathers them.
  out = tmp_path / 'plan.json'
  result = subprocess.run([sys.executable, str(ROOT / 'main.py'), 'plan', '--config.model=tiny-random',
                           f'--config.workdir={tmp_path}', '--config.erase.method=esd-x', '--config.plan.devices=4',
                           f'--config.plan.json={out}', '--config.mesh.data=1', '--config.mesh.fsdp=4',
                           '--config.mesh.min_shard_size=1024'], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'per device:' in result.stdout and 'FLOP per iteration' in result.stdout
  sharded = json.loads(out.read_text())
  shapes = param_shapes(build_abstract(UNET))
  whole = 4 * sum(int(np.prod(s)) for s in shapes.values())
  small = 4 * sum(int(np.prod(s)) for s in shapes.values() if np.prod(s) < 1024)
  assert sharded['devices'] == 4 and sharded['mesh']['fsdp'] == 4
  assert small + (whole - small) / 4 <= sharded['per_device_bytes']['frozen_base'] < 0.5 * whole
  assert sharded['collective_bytes_per_device']['all-gather'] > 0


def test_collective_bytes_reads_hlo_result_shapes():
  hlo = '\n'.join([
      '%all-gather.3 = f32[320,4,3,3]{3,2,1,0} all-gather(f32[80,4,3,3]{3,2,1,0} %p), dimensions={0}',
      '%ars = (bf16[8]{0}, f32[2,2]{1,0}) all-reduce-start(bf16[8]{0} %a, f32[2,2]{1,0} %b), to_apply=%add',
      '%rs = f32[10]{0} reduce-scatter(f32[40]{0} %c), dimensions={0}',
      '%add.1 = f32[10]{0} add(f32[10]{0} %x, f32[10]{0} %y)'])
  assert collective_bytes(hlo) == {'all-gather': 4 * 320 * 4 * 9, 'all-reduce': 2 * 8 + 4 * 4,
                                   'reduce-scatter': 40, 'all-to-all': 0, 'collective-permute': 0}


def test_sampler_steps_follow_the_draws():
  for convention in esd.CONVENTIONS:
    objective = esd.Objective(convention=convention, ddim_steps=10)
    scheduler = objective.scheduler(dict(SCHEDULER))
    steps = np.asarray([int(esd.draw(jax.random.key(i), objective, scheduler, batch=1, latent_shape=(2, 2, 1),
                                     num_concepts=1).step) for i in range(400)])
    possible = esd.sampler_steps(objective)
    # Every drawn step is one of the values sampler_steps lists, and each value is drawn.
    low = 0 if convention != 'diffusers-v1' else 1
    assert set(steps - low) == set(range(len(possible)))
