"""DDIM and PNDM (PLMS) against diffusers' DDIMScheduler and PNDMScheduler.

Trajectories are compared at every step with the error relative to the reference's largest magnitude at that
step: max|ours - ref| / max|ref| (both float32; JAX on CPU).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from esd_jax.models.config import ModelConfigError
from esd_jax.schedulers import DDIM, PNDM, make_scheduler

# Relative error of a sample after each step. The two implementations' float32 roundings differ with the CPU's vector
# width (torch's and XLA's kernels; AVX-512 here): v-prediction trajectories reach 1.7e-6 after 50 steps on this
# CPU, while a wrong formula or coefficient shows as 1e-3 or more.
TOL = 4e-6
SHAPE = (2, 4, 8, 8)

SD = {  # Stable Diffusion 1.x scheduler/scheduler_config.json
    '_class_name': 'PNDMScheduler', '_diffusers_version': '0.7.0.dev0', 'beta_start': 0.00085,
    'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'num_train_timesteps': 1000,
    'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1, 'trained_betas': None,
    'clip_sample': False,
}
SDXL = {  # Stable Diffusion XL scheduler/scheduler_config.json
    '_class_name': 'EulerDiscreteScheduler', '_diffusers_version': '0.19.0.dev0', 'beta_end': 0.012,
    'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'clip_sample': False,
    'interpolation_type': 'linear', 'num_train_timesteps': 1000, 'prediction_type': 'epsilon',
    'sample_max_value': 1.0, 'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1,
    'timestep_spacing': 'leading', 'trained_betas': None, 'use_karras_sigmas': False,
}
# The sibling class's fields (skip_prk_steps in a DDIM config, clip_sample in a PNDM one) are in SD configs
# and ignored by diffusers; they are here so that both kinds can be built from each config.
CONFIGS = {
    'sd': SD,
    'sdxl': SDXL,
    'linear_trailing': {'_class_name': 'DDIMScheduler', 'beta_schedule': 'linear',
                        'timestep_spacing': 'trailing', 'set_alpha_to_one': True, 'clip_sample': False,
                        'skip_prk_steps': True},
    'vpred_linspace_clip': {'_class_name': 'PNDMScheduler', 'beta_schedule': 'scaled_linear',
                            'beta_start': 0.00085, 'beta_end': 0.012, 'prediction_type': 'v_prediction',
                            'timestep_spacing': 'linspace', 'clip_sample': True, 'skip_prk_steps': True},
    'trained_betas': {'_class_name': 'PNDMScheduler', 'num_train_timesteps': 500, 'steps_offset': 2,
                      'trained_betas': np.linspace(2e-4, 3e-2, 500).tolist(), 'skip_prk_steps': True},
    # DDIM only (PNDM has no clip_sample_range, sample prediction or zero-SNR rescaling).
    'cosine_sample_clip': {'_class_name': 'DDIMScheduler', 'beta_schedule': 'squaredcos_cap_v2',
                           'prediction_type': 'sample', 'clip_sample': True, 'clip_sample_range': 1.5},
    'zero_snr_vpred': {'_class_name': 'DDIMScheduler', 'beta_schedule': 'scaled_linear',
                       'beta_start': 0.00085, 'beta_end': 0.012, 'rescale_betas_zero_snr': True,
                       'prediction_type': 'v_prediction', 'timestep_spacing': 'trailing',
                       'clip_sample': False},
}
PNDM_CONFIGS = ['sd', 'sdxl', 'linear_trailing', 'vpred_linspace_clip', 'trained_betas']
REFERENCE = {'ddim': DDIMScheduler, 'pndm': PNDMScheduler}


def _pair(name, kind):
  config = CONFIGS[name]
  return make_scheduler(config, kind), REFERENCE[kind].from_config(config)


def _randn(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _step_errors(ours, ref, n, eta=0.0, use_clipped_model_output=False, seed=0):
  """Runs both schedulers over the same fake model outputs (and variance noise), returning the relative error
  of each step's sample."""
  rng = np.random.default_rng(seed)
  ref.set_timesteps(n)
  steps = len(ref.timesteps)
  outs, noises = _randn(rng, steps, *SHAPE), _randn(rng, steps, *SHAPE)
  x_ref = torch.from_numpy(_randn(rng, *SHAPE))
  x, state = jnp.asarray(x_ref.numpy()), ours.init_state(jnp.asarray(x_ref.numpy()))
  ddim = {'eta': eta, 'use_clipped_model_output': use_clipped_model_output}
  errors = []
  for i, t in enumerate(ref.timesteps):
    if isinstance(ours, DDIM):
      x_ref = ref.step(torch.from_numpy(outs[i]), t, x_ref, variance_noise=torch.from_numpy(noises[i]),
                       **ddim).prev_sample
      x, state = ours.step(state, jnp.asarray(outs[i]), x, i, n, noise=jnp.asarray(noises[i]), **ddim)
    else:
      x_ref = ref.step(torch.from_numpy(outs[i]), t, x_ref).prev_sample
      x, state = ours.step(state, jnp.asarray(outs[i]), x, i, n)
    want = x_ref.numpy()
    errors.append(float(np.abs(np.asarray(x) - want).max() / np.abs(want).max()))
  return errors


@pytest.mark.parametrize('kind,name', [('ddim', c) for c in CONFIGS] + [('pndm', c) for c in PNDM_CONFIGS])
def test_schedule_and_timesteps(kind, name):
  ours, ref = _pair(name, kind)
  # Bit-identical to diffusers here (torch's fused multiply-add linspace is reproduced), except zero-SNR rescaling:
  # its float32 sqrt, square and division round differently with the CPU's vector width (AVX2 or AVX-512, in torch and
  # in numpy): on an AVX-512 CPU ᾱ differs by up to 4e-6 relative, β by up to 2.5e-4 relative near the end. There both
  # are held to diffusers' own rescaling in float64: ours is within twice the error of diffusers' float32 schedule.
  got, want = np.asarray(ours.alphas_cumprod, np.float64), ref.alphas_cumprod.numpy().astype(np.float64)
  if CONFIGS.get(name, {}).get('rescale_betas_zero_snr') and kind == 'ddim':
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    config = ref.config
    betas = rescale_zero_terminal_snr(torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5,
                                                     config.num_train_timesteps, dtype=torch.float64) ** 2)
    error = lambda a, exact: np.abs(np.asarray(a, np.float64) - exact).max()
    for a, b, exact in ((got, want, torch.cumprod(1 - betas, 0).numpy()), (ours.betas, ref.betas.numpy(), betas.numpy())):
      assert error(a, exact) <= 2 * error(b, exact), (error(a, exact), error(b, exact))
  else:
    np.testing.assert_allclose(got, want, rtol=2.4e-7, atol=0)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=0, atol=2.4e-7)
  assert ours.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), rel=2.4e-7)
  assert ours.alphas_cumprod.dtype == jnp.float32
  for n in (1, 2, 3, 7, 10, 25, 50, 333, ours.num_train_timesteps):
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps(n), ref.timesteps.numpy())
  assert int(ours.timestep(jnp.int32(3), 50)) == ours.timesteps(50)[3]


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('eta', [0.0, 0.7])
def test_ddim_trajectory(name, eta):
  ours, ref = _pair(name, 'ddim')
  for n in (10, 25, 50):
    assert max(_step_errors(ours, ref, n, eta)) < TOL, n


@pytest.mark.parametrize('name', ['vpred_linspace_clip', 'cosine_sample_clip'])
def test_ddim_clipped_model_output(name):
  ours, ref = _pair(name, 'ddim')
  assert max(_step_errors(ours, ref, 25, eta=0.5, use_clipped_model_output=True)) < TOL


@pytest.mark.parametrize('name', PNDM_CONFIGS)
def test_plms_trajectory(name):
  ours, ref = _pair(name, 'pndm')
  for n in (10, 25, 50):
    assert max(_step_errors(ours, ref, n)) < TOL, n


def test_plms_timesteps_repeat_second():
  ts = make_scheduler(SD).timesteps(10)
  np.testing.assert_array_equal(ts, [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1])


def _model(sched):
  """A fake model that depends on both the sample and the timestep, so the loop is a real feedback loop."""
  table = jnp.asarray(_randn(np.random.default_rng(1), 16, *SHAPE))  # small: jit embeds it as a constant
  return lambda x, t: 0.1 * x + table[t % 16]


@pytest.mark.parametrize('kind', ['ddim', 'pndm'])
def test_loop_in_one_jit(kind):
  """The whole loop inside one jit equals the eager loop; a partial loop of traced length, resumed from its
  state, equals the full loop (what a training step that samples to a random step needs)."""
  sched, n = make_scheduler(SD, kind), 25
  steps = len(sched.timesteps(n))
  model, x0, key = _model(sched), jnp.asarray(_randn(np.random.default_rng(2), *SHAPE)), jax.random.key(0)
  # One compilation serves every eta, start and stop: they are all traced.
  ddim_kwargs = lambda eta: {'key': key, 'eta': eta} if kind == 'ddim' else {}
  run = jax.jit(lambda x, start, stop, state, eta: sched.denoise(
      model, x, n, start=start, stop=stop, state=state, **ddim_kwargs(eta)))
  rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
  for eta in ([0.0, 0.8] if kind == 'ddim' else [0.0]):
    eager, state, trajectory = x0, sched.init_state(x0), []
    for i in range(steps):
      step_kwargs = {'key': jax.random.fold_in(key, i), 'eta': eta} if kind == 'ddim' else {}
      eager, state = sched.step(state, model(eager, sched.timesteps(n)[i]), eager, i, n, **step_kwargs)
      trajectory.append(eager)
    init = sched.init_state(x0)
    assert rel(run(x0, 0, steps, init, eta)[0], eager) < TOL
    for stop in (1, 2, 7):
      x, state = run(x0, 0, stop, init, eta)
      assert rel(x, trajectory[stop - 1]) < TOL
      assert rel(run(x, stop, steps, state, eta)[0], eager) < TOL
  assert run._cache_size() == 1


@pytest.mark.parametrize('kind', ['ddim', 'pndm'])
def test_add_noise_and_velocity(kind):
  ours, ref = _pair('vpred_linspace_clip', kind)
  rng = np.random.default_rng(3)
  x0, noise, t = _randn(rng, *SHAPE), _randn(rng, *SHAPE), np.array([17, 980])
  want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want,
                             rtol=0, atol=1e-6)
  if kind == 'ddim':  # get_velocity exists on DDIMScheduler only
    want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want,
                               rtol=0, atol=1e-6)
  assert ours.scale_model_input(x0, 5) is x0 and ours.init_noise_sigma == 1.0
  assert ours.prediction_type == 'v_prediction'


def test_configs_diffusers_writes_are_accepted():
  for ref in (DDIMScheduler(), PNDMScheduler(skip_prk_steps=True)):
    config = json.loads(ref.to_json_string())
    sched = make_scheduler(config)
    assert type(sched) is {'DDIMScheduler': DDIM, 'PNDMScheduler': PNDM}[config['_class_name']]
    assert {k: v for k, v in config.items() if not k.startswith('_')} == dict(sched.config)


def test_reinterpretation_follows_from_config():
  # DDIM from SD's PNDM config keeps clip_sample / set_alpha_to_one as written, and takes DDIM's defaults
  # for what the PNDM config lacks.
  ddim = make_scheduler(SD, 'ddim')
  ref = DDIMScheduler.from_config(SD).config
  assert isinstance(ddim, DDIM) and ddim.config == {k: ref[k] for k in DDIM.DEFAULTS}
  assert make_scheduler({k: v for k, v in SD.items() if k != 'clip_sample'}, 'ddim').config['clip_sample']
  assert isinstance(make_scheduler(SDXL, 'pndm'), PNDM)


def test_hashable_static_value():
  a, b = make_scheduler(SD, 'ddim'), make_scheduler(dict(SD), 'ddim')
  assert a == b and hash(a) == hash(b) and a != make_scheduler(SD, 'pndm')
  f = jax.jit(lambda sched, x: sched.add_noise(x, x, 10), static_argnums=0)
  f(a, jnp.ones(3))
  f(b, jnp.ones(3))
  assert f._cache_size() == 1


@pytest.mark.parametrize('config,kind,match', [
    (dict(SD, skip_prk_steps=False), None, 'Runge-Kutta .PRK. .* not implement'),
    ({'_class_name': 'DDIMScheduler', 'thresholding': True}, None, 'thresholding .* not implemented'),
    (dict(SD, beta_schedule='exp'), None, 'beta_schedule'),
    (dict(SD, prediction_type='sample'), None, 'prediction_type'),
    (dict(SD, timestep_spacing='karras'), 'ddim', 'timestep_spacing'),
    (dict(SD, interpolation_type='linear'), None, 'interpolation_type'),  # unknown in a PNDM config
    (SDXL, None, 'EulerDiscreteScheduler, which esd-jax does not implement.*kind="ddim"'),
    ({'beta_start': 0.001}, None, 'names no scheduler class'),
    ({'beta_strat': 0.001}, 'ddim', 'beta_strat'),  # a config naming no class is read strictly
    ({'trained_betas': [0.1, 0.2]}, 'ddim', 'trained_betas has shape'),
])
def test_bad_configs(config, kind, match):
  with pytest.raises(ModelConfigError, match=match):
    make_scheduler(config, kind)


def test_bad_calls():
  with pytest.raises(ValueError, match='kind'):
    make_scheduler(SD, 'euler')
  sched, x = make_scheduler(SD, 'ddim'), jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match='needs variance noise'):
    sched.step((), x, x, 0, 10, eta=0.5)
  for n in (0, 1001):
    with pytest.raises(ValueError, match='num_inference_steps'):
      sched.timesteps(n)
