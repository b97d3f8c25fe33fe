"""Self-checks of the PyTorch ESD reference (tests/torch_esd.py) against docs/method.md on a tiny random UNet."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from tests.reference import randomize, rel_err
from tests.torch_esd import SAMPLERS, TRAIN_METHODS, esd_step, sample_scheduler
from tests.torch_pipelines import SD_SCHEDULER

SCHEDULER = {**SD_SCHEDULER, 'skip_prk_steps': True}  # SD 1.4's PNDM config skips the Runge-Kutta warm-up
SD14_UNET = Path(__file__).parents[1] / 'esd_jax/models/reference_configs/sd-v1-4/unet/config.json'
ETA = 1.5


@pytest.fixture(scope='module', autouse=True)
def one_thread():
  """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's waiting makes a
  12 ms forward take seconds."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def base_unet():
  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
      cross_attention_dim=32, attention_head_dim=4, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))
  return randomize(unet.eval(), seed=0, scale=0.1)


@pytest.fixture(scope='module')
def inputs():
  g = torch.Generator().manual_seed(1)
  x_T = torch.randn((1, 4, 8, 8), generator=g)
  # Large embeddings make the prompts' predictions differ by tens of percent, so that every term of the
  # target shows in the checks.
  c, u, f = (3 * torch.randn((1, 6, 32), generator=g) for _ in range(3))
  return dict(x_T=x_T.numpy(), concept_emb=c.numpy(), uncond_emb=u.numpy()), f.numpy()


class Recorder:
  """Records every call of a UNet and of its deep copies (the teacher): (by the student?, batch, timestep).
  deepcopy shares a plain function and the list it closes over (a bound method would copy the recorder)."""

  def __init__(self, unet):
    calls = self.calls = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        (module is unet, args[0].shape[0], int(args[1]))), with_kwargs=True)

  def sampling(self):  # guided calls run the unconditional and conditional prompts as one batch of two
    return [(student, t) for student, b, t in self.calls if b == 2]

  def queries(self):
    return [(student, t) for student, b, t in self.calls if b == 1]


def teacher_then_student(query_t, teacher_calls=2):
  return [(False, query_t)] * teacher_calls + [(True, query_t)]


def run(base_unet, inputs, *, method='esd-x', erase_from=False, **kw):
  unet = copy.deepcopy(base_unet)
  rec = Recorder(unet)
  args, f = inputs
  trained = [n for n, _ in unet.named_parameters() if TRAIN_METHODS[method](n)]
  out = esd_step(unet, SCHEDULER, **args, erase_from_emb=f if erase_from else None, eta=ETA, trained=trained,
                 **kw)
  return unet, rec, out


def eps(unet, x, t, emb):
  return unet(torch.as_tensor(x), t, encoder_hidden_states=torch.as_tensor(emb)).sample.numpy()


# docs/method.md §2 table: t_enc -> (sampling steps, DDPM t at which x_t lies).
PAPER_TABLE = {0: (49, 0), 1: (49, 0), 2: (48, 1), 25: (25, 461), 49: (1, 941)}


@pytest.mark.parametrize('t_enc', sorted(PAPER_TABLE))
def test_paper_walk_matches_the_spec_table(base_unet, inputs, t_enc):
  steps, lies_at = PAPER_TABLE[t_enc]
  query_t = 20 * t_enc + 7
  unet, rec, out = run(base_unet, inputs, convention='paper', step_index=t_enc, query_t=query_t)
  walk = list(range(961, 961 - 20 * steps, -20))
  assert rec.sampling() == [(True, t) for t in walk]  # sampled with θ, the model being trained
  assert max(walk[-1] - 20, 0) == lies_at
  assert rec.queries() == teacher_then_student(query_t)
  # The CompVis walk from 961 equals diffusers' DDIM (leading, offset 1, ᾱ_prev of t=1 is ᾱ[0]) resumed at
  # its second timestep: the float64 β schedule only moves the last digits.
  scheduler = DDIMScheduler.from_config(SCHEDULER)
  scheduler.set_timesteps(50)
  args, _ = inputs
  with torch.no_grad():
    ref = sample_scheduler(base_unet, scheduler, scheduler.timesteps[1:1 + steps],
                           *(torch.as_tensor(args[k]) for k in ('x_T', 'concept_emb', 'uncond_emb')), 3.0)
  assert rel_err(out['x_t'], ref) < 1e-4
  with pytest.raises(ValueError, match='query_t'):
    run(base_unet, inputs, convention='paper', step_index=t_enc, query_t=20 * t_enc + 20)


@pytest.mark.parametrize('k', [1, 2, 48])
def test_diffusers_v1_runs_k_steps_with_the_trained_model(base_unet, inputs, k):
  unet, rec, out = run(base_unet, inputs, convention='diffusers-v1', step_index=k, query_t=1000 - 20 * k)
  assert rec.sampling() == [(True, t) for t in range(981, 981 - 20 * k, -20)]  # sampled with θ
  assert rec.queries() == teacher_then_student(1000 - 20 * k)
  with pytest.raises(ValueError, match='query_t'):
    run(base_unet, inputs, convention='diffusers-v1', step_index=k, query_t=981 - 20 * k)


@pytest.mark.parametrize('sampler,k,walk', [
    ('ddim', 0, []), ('ddim', 1, [981]), ('ddim', 49, list(range(981, 0, -20))[:49]),
    ('pndm', 3, [981, 961, 961])])
def test_diffusers_v2_runs_steps_before_k_with_the_frozen_model(base_unet, inputs, sampler, k, walk):
  scheduler = SAMPLERS[sampler].from_config(SCHEDULER)
  scheduler.set_timesteps(50)
  query_t = int(scheduler.timesteps[k])
  unet, rec, out = run(base_unet, inputs, convention='diffusers-v2', step_index=k, query_t=query_t,
                       sampler=sampler)
  assert rec.sampling() == [(False, t) for t in walk]  # sampled with θ*, the frozen model
  assert rec.queries() == teacher_then_student(query_t)
  if k == 0:
    np.testing.assert_array_equal(out['x_t'], inputs[0]['x_T'])
  with pytest.raises(ValueError, match='step_index'):
    run(base_unet, inputs, convention='diffusers-v2', step_index=50, query_t=query_t, sampler=sampler)


def test_adam_moves_only_trained_tensors(base_unet, inputs):
  unet, _, out = run(base_unet, inputs, convention='paper', step_index=25, query_t=510, lr=1e-3)
  before, after = dict(base_unet.named_parameters()), dict(unet.named_parameters())
  trained = {n for n in before if TRAIN_METHODS['esd-x'](n)}
  assert set(out['grads']) == set(out['params_after']) == trained
  for name, p in after.items():
    assert p.requires_grad == before[name].requires_grad and p.grad is None
    if name not in trained:
      assert torch.equal(p, before[name]), name
      continue
    np.testing.assert_array_equal(out['params_after'][name], p.detach().numpy())
    g = out['grads'][name]
    assert np.abs(g).max() > 0, name
    # Adam's first step from zero moments: Δ = −lr · g / (|g| + ε).
    step = p.detach().numpy() - before[name].detach().numpy()
    np.testing.assert_allclose(step, -1e-3 * g / (np.abs(g) + 1e-8), atol=1e-7, err_msg=name)
  # The loss is the mean square error of the student's concept prediction at (x_t, query_t) to the target.
  student = eps(base_unet, out['x_t'], 510, inputs[0]['concept_emb'])
  np.testing.assert_allclose(out['loss'], np.mean((student - out['target']) ** 2), rtol=1e-5)


def teacher_eps(base_unet, inputs, out, query_t):
  args, f = inputs
  return {k: eps(base_unet, out['x_t'], query_t, e)
          for k, e in [('c', args['concept_emb']), ('u', args['uncond_emb']), ('f', f)]}


def test_v2_target_is_the_paper_formula(base_unet, inputs):
  scheduler = DDIMScheduler.from_config(SCHEDULER)
  scheduler.set_timesteps(50)
  q = int(scheduler.timesteps[10])
  _, _, out = run(base_unet, inputs, convention='diffusers-v2', step_index=10, query_t=q)
  e = teacher_eps(base_unet, inputs, out, q)
  paper = e['u'] - ETA * (e['c'] - e['u'])
  assert rel_err(out['target'], paper) < 1e-5
  assert rel_err(out['target'], e['c'] - (ETA + 1) * (e['c'] - e['u'])) < 1e-5

  _, _, out = run(base_unet, inputs, convention='diffusers-v2', step_index=10, query_t=q, erase_from=True)
  e = teacher_eps(base_unet, inputs, out, q)
  assert rel_err(out['target'], e['f'] - (ETA + 1) * (e['c'] - e['u'])) < 1e-5


@pytest.mark.parametrize('convention,k,q', [('paper', 45, 905), ('diffusers-v1', 5, 900)])
def test_erase_from_anchors_paper_and_v1_on_f(base_unet, inputs, convention, k, q):
  _, rec, out = run(base_unet, inputs, convention=convention, step_index=k, query_t=q, erase_from=True)
  e = teacher_eps(base_unet, inputs, out, q)
  assert rel_err(out['target'], e['f'] - ETA * (e['c'] - e['u'])) < 1e-5
  assert rec.queries() == teacher_then_student(q, teacher_calls=3)  # θ* on c, "", f; θ on f
  # The student's prompt f is the sampling prompt too.
  args, f = inputs
  sampled_on_f = run(base_unet, ({**args, 'concept_emb': f}, f), convention=convention, step_index=k,
                     query_t=q)[2]
  np.testing.assert_array_equal(out['x_t'], sampled_on_f['x_t'])
  student = eps(base_unet, out['x_t'], q, f)
  np.testing.assert_allclose(out['loss'], np.mean((student - out['target']) ** 2), rtol=1e-5)


def test_erasing_c_from_c_is_plain_erasure(base_unet, inputs):
  """The anchor falls back to ε*("") (docs/method.md §1)."""
  args, _ = inputs
  plain = run(base_unet, inputs, convention='paper', step_index=45, query_t=905)[2]
  same = esd_step(copy.deepcopy(base_unet), SCHEDULER, **args, erase_from_emb=args['concept_emb'], eta=ETA,
                  convention='paper', step_index=45, query_t=905, trained=list(plain['grads']))
  np.testing.assert_array_equal(same['target'], plain['target'])


# docs/method.md §3 on the SD 1.4 UNet: method -> (tensors, parameters).
SD14_COUNTS = {
    'esd-x': (80, 43_962_560), 'esd-u': (598, 813_495_680), 'esd-x-strict': (32, 19_169_280),
    'esd-self': (80, 49_574_080), 'esd-all': (686, 859_520_964), 'notime': (678, 857_458_240),
    'xlayer': (10, 3_605_760), 'selflayer': (10, 8_193_920)}


def test_train_methods_count_the_spec_table_on_sd14():
  with torch.device('meta'):
    unet = UNet2DConditionModel.from_config(json.loads(SD14_UNET.read_text()))
  params = dict(unet.named_parameters())
  counts = {m: (len(sel := [p for n, p in params.items() if rule(n)]), sum(p.numel() for p in sel))
            for m, rule in TRAIN_METHODS.items()}
  assert counts == SD14_COUNTS
