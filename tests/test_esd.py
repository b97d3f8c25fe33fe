"""One ESD step in JAX against the independent PyTorch reference (tests/torch_esd.py), same weights and draws."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import UNet2DConditionModel

from esd_jax import esd
from esd_jax.generate import Conditioning
from esd_jax.methods import trained_keys
from esd_jax.models import build_abstract
from esd_jax.models.state_dict import split_flat, state_dict, stored_tensors
from tests import torch_esd
from tests.reference import load_from_torch, nchw, nhwc, rel_err
from tests.torch_pipelines import SD_SCHEDULER

STEPS = 10  # a short trajectory: the conventions' logic is the same at 50
SCHEDULER = {'_class_name': 'DDIMScheduler', 'num_train_timesteps': 1000, **SD_SCHEDULER}
# (step index, query timestep) per convention, valid for 10 steps: paper t_enc = 6 → t ∈ [600, 699];
# diffusers-v1 k = 3 → t = 1000 − 300; diffusers-v2 k = 4 → DDIM timesteps[4] = 501.
DRAWS = {'paper': (6, 637), 'diffusers-v1': (3, 700), 'diffusers-v2': (4, 501)}
ETA, LR = 2.0, 1e-3


@functools.cache
def _setup():
  torch.manual_seed(0)
  ref = UNet2DConditionModel(
      sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
      attention_head_dim=4, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D')).eval()
  ours = load_from_torch(build_abstract({**ref.config, '_class_name': 'UNet2DConditionModel'}), ref)
  rng = np.random.default_rng(0)
  emb = {name: rng.standard_normal((1, 6, 32)).astype(np.float32) for name in ('concept', 'uncond', 'from')}
  emb['retain'] = rng.standard_normal((2, 6, 32)).astype(np.float32)  # two retain prompts; the draw takes the second
  x_T = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  return ref, ours, emb, x_T


@functools.cache
def _ours(convention: str, erase_from: bool, retain: bool = False):
  """Our loss, x_t, gradients and parameters after one Adam step, training the `notime` subset.

  One compilation per convention serves every method: at the first step the student equals the frozen
  model (so x_t does not depend on what trains), a tensor's gradient does not depend on which other tensors
  train, and Adam updates each element on its own. `notime` contains esd-x, esd-u and esd-x-strict and is
  still a partial overlay on the frozen tree. `retain`: with the preservation term, retain prompt 1 drawn, its
  λ = 0.7 given as 0.35 × the step's preserve_scale 2 (the input erase-until's settle changes).
  """
  _, ours, emb, x_T = _setup()
  layout, frozen = split_flat(ours)
  objective = esd.Objective(convention=convention, negative_guidance=ETA, ddim_steps=STEPS, preserve_weight=0.35)
  scheduler = objective.scheduler(SCHEDULER)
  cond = lambda name: Conditioning(jnp.asarray(emb[name]))
  prompts = esd.Prompts(cond('uncond'), cond('concept'), cond('from') if erase_from else None,
                        jnp.asarray([erase_from]), retain=cond('retain') if retain else None)
  step, t = DRAWS[convention]
  draws = esd.Draws(jnp.asarray(x_T), jnp.int32(step), jnp.int32(t), jnp.int32(0), jnp.int32(1))
  trained = {k: frozen[k] for k in trained_keys(frozen, 'notime')}
  loss_fn = jax.jit(jax.value_and_grad(functools.partial(esd.esd_loss, layout=layout, objective=objective,
                                                         scheduler=scheduler), has_aux=True))
  (loss, x_t), grads = loss_fn(trained, frozen, prompts=prompts, draws=draws, preserve_scale=2.0)
  tx = esd.optimizer(LR)
  updates, _ = tx.update(grads, tx.init(trained), trained)
  return float(loss), np.asarray(x_t), grads, optax.apply_updates(trained, updates)


CASES = [(c, m, False, False) for c in esd.CONVENTIONS for m in ('esd-x', 'esd-u', 'esd-x-strict')]
CASES += [('paper', 'esd-x', True, False), ('diffusers-v2', 'esd-x', True, False)]
CASES += [('paper', 'esd-u', False, True), ('diffusers-v2', 'esd-x', True, True)]  # with the preservation term


@pytest.mark.parity
@pytest.mark.parametrize('convention,method,erase_from,retain', CASES)
def test_step_matches_pytorch_reference(convention, method, erase_from, retain):
  ref_unet, ours, emb, x_T = _setup()
  loss, x_t, grads, after = _ours(convention, erase_from, retain)
  grads, after = stored_tensors(grads), stored_tensors(after)  # PyTorch's layouts (convolution kernels OIHW)
  keys = trained_keys(split_flat(ours)[1], method)
  step, t = DRAWS[convention]
  ref_copy = UNet2DConditionModel.from_config(ref_unet.config)
  ref_copy.load_state_dict(ref_unet.state_dict())
  want = torch_esd.esd_step(
      ref_copy, SCHEDULER, convention=convention, x_T=nchw(x_T), step_index=step, query_t=t,
      concept_emb=emb['concept'], uncond_emb=emb['uncond'], erase_from_emb=emb['from'] if erase_from else None,
      eta=ETA, guidance=3.0, num_ddim_steps=STEPS, trained=keys, lr=LR,
      retain_emb=emb['retain'][1:] if retain else None, preserve_weight=0.7)
  assert sorted(want['grads']) == keys
  assert abs(loss - want['loss']) <= 1e-4 * abs(want['loss']) and want['loss'] > 0
  assert rel_err(x_t, nhwc(want['x_t'])) <= 1e-4
  for k in keys:
    assert rel_err(grads[k], want['grads'][k]) <= 1e-4, k
  # Parameters after the step, over the whole trained set: zero-initialised biases hold only Adam's first
  # update lr·g/(|g| + ε), which turns rounding in gradients of ~1e-8 into visible differences per tensor.
  flat = lambda tree: np.concatenate([np.ravel(tree[k]) for k in keys])
  assert rel_err(flat(after), flat(want['params_after'])) <= 1e-4
  assert any(np.abs(np.asarray(after[k]) - np.asarray(ours_param)).max() > 0  # the step did move the weights
             for k, ours_param in state_dict(ours).items() if k in keys)


def test_remat_recomputes_the_same_student_gradients():
  # The student's forward and backward as esd_loss runs them, its blocks rematerialised or not: the same loss and
  # gradients (the step with remat 'none' is the one checked against PyTorch above), to float32 rounding.
  _, ours, emb, x_T = _setup()
  layout, frozen = split_flat(ours)
  trained = {k: frozen[k] for k in trained_keys(frozen, 'esd-u')}
  cond = Conditioning(jnp.asarray(emb['concept']))

  def student_loss(trained, remat):
    student = layout.module({**frozen, **trained})
    student.remat = remat
    return jnp.mean(jnp.square(esd._predict(student, jnp.asarray(x_T), 637, cond, jnp.float32)))
  results = {remat: jax.jit(jax.value_and_grad(student_loss), static_argnums=1)(trained, remat)
             for remat in ('none', 'blocks', 'dots')}
  loss, grads = results['none']
  for remat in ('blocks', 'dots'):
    assert abs(float(results[remat][0]) - float(loss)) <= 1e-6 * abs(float(loss))
    assert all(rel_err(results[remat][1][k], grads[k]) <= 1e-5 for k in grads), remat


def test_several_concepts_draw_one_per_iteration():
  """With concepts [c0, c1] and the draw picking c1, the step is exactly the step of c1 alone."""
  _, ours, emb, x_T = _setup()
  layout, frozen = split_flat(ours)
  objective = esd.Objective(convention='diffusers-v2', negative_guidance=ETA, ddim_steps=4)
  scheduler = objective.scheduler(SCHEDULER)
  trained = {k: frozen[k] for k in trained_keys(frozen, 'esd-x-strict')}
  loss_fn = jax.jit(functools.partial(esd.esd_loss, layout=layout, objective=objective, scheduler=scheduler))
  uncond = Conditioning(jnp.asarray(emb['uncond']))
  pair = Conditioning(jnp.concatenate([jnp.asarray(emb['concept']), jnp.asarray(emb['from'])]))
  alone = Conditioning(jnp.asarray(emb['from']))
  draws = lambda concept: esd.Draws(jnp.asarray(x_T), jnp.int32(2), jnp.int32(scheduler.timestep(2, 4)),
                                    jnp.int32(concept))
  no_from = jnp.zeros((2,), bool)
  loss_pair, x_pair = loss_fn(trained, frozen, prompts=esd.Prompts(uncond, pair, None, no_from), draws=draws(1))
  loss_alone, x_alone = loss_fn(trained, frozen, prompts=esd.Prompts(uncond, alone, None, no_from[:1]),
                                draws=draws(0))
  loss_other, _ = loss_fn(trained, frozen, prompts=esd.Prompts(uncond, pair, None, no_from), draws=draws(0))
  assert float(loss_pair) == float(loss_alone) and np.array_equal(x_pair, x_alone)
  assert float(loss_other) != float(loss_pair)
