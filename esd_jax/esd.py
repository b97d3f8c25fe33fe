"""The ESD objective (docs/method.md §1–2): erase concept c by teaching the UNet the frozen model's negative guidance.

    target = anchor − η · (ε*(x_t, c, t) − ε*(x_t, "", t))        anchor = ε*(x_t, "", t), or ε*(x_t, f, t)
    loss   = mean((ε_θ(x_t, c, t) − stop_gradient(target))²)      the student sees f instead of c if given
           + λ · mean((ε_θ(x_r, r, t) − ε*(x_r, r, t))²)          optional: a prompt r to preserve (below)

ε* is the frozen model, ε_θ the one being trained, η the negative guidance, f the optional `erase_from`
prompt (erase c only from f). x_t is no training image: a sampler runs from noise x_T toward the concept with
classifier-free guidance and stops part-way. How it runs and which timestep the models are then asked at
differ between the three versions of the authors' code (`CONVENTIONS`, docs/method.md §2, §4); all are here, with
η always in the paper's convention. Every random draw is an input (`Draws`), so that a PyTorch
implementation fed the same draws gives the same loss and gradients (tests/torch_esd.py).

Preservation (not in the paper; the retain loss of ESD's follow-ups such as AdvUnlearn's utility term): with
retain prompts, each iteration also draws one, r, samples x_r for it from the same x_T in the same batched sampler
run as x_t, and asks the student to predict there what the frozen model predicts, with weight λ
(`Objective.preserve_weight`): the erasure may not move what the model draws for r.

Robust erasure (not in the paper; AdvUnlearn's adversarial training, docs/method.md §9): with `Prompts.adversary`,
each iteration first searches, for a few Adam steps, the perturbation δ of the concept prompt's word embeddings
that best restores the concept under the current student at x_t (the student's ε_θ(x_t, c + δ) pulled toward
ε*(x_t, c)), then trains the student on c + δ instead of c. With zero search steps δ = 0 and the step is plain
ESD's, exactly. With `Adversary.tokens` = k > 0 the search moves k tokens put before the prompt's words instead,
drawn from the vocabulary at random each iteration (AdvUnlearn's `prefix_k`: the attack's own form), and the
student is asked at c as well as at the prefixed prompt, both pulled toward the same target.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from esd_jax.generate import Conditioning
from esd_jax.models.state_dict import ParamLayout
from esd_jax.schedulers import DDIM, make_scheduler

CONVENTIONS = ('paper', 'diffusers-v1', 'diffusers-v2')
Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """The static settings of the objective.

  convention: 'paper' (CompVis, the paper's numbers), 'diffusers-v1' (first diffusers port), 'diffusers-v2'
    (2025 code: the frozen model samples; it anchors on ε*(c) with η_C = η + 1, converted here).
  negative_guidance: η of the paper ("ESD-x-3": η = 3).
  guidance: classifier-free guidance of the sampler producing x_t ("start guidance", 3 in the paper).
  ddim_steps: sampler steps of a full trajectory (50).
  sampler: for diffusers-v2, 'ddim' or 'pndm' (PLMS, that code's pipeline default); the others use DDIM.
  compute_dtype: dtype of the UNet's arithmetic; parameters, gradients and the loss stay float32.
  remat: how the student's UNet rematerialises its blocks for the backward pass (models.unet.REMAT): less memory
    for more compute, the same numbers.
  preserve_weight: λ of the preservation term (used when Prompts.retain is given).
  """

  convention: str = 'paper'
  negative_guidance: float = 1.0
  guidance: float = 3.0
  ddim_steps: int = 50
  sampler: str = 'ddim'
  compute_dtype: str = 'float32'
  remat: str = 'none'
  preserve_weight: float = 1.0

  def __post_init__(self):
    if self.convention not in CONVENTIONS:
      raise ValueError(f'Unknown ESD convention {self.convention!r}; choose one of {CONVENTIONS}.')
    if self.sampler not in ('ddim', 'pndm') or (self.sampler == 'pndm' and self.convention != 'diffusers-v2'):
      raise ValueError(f"sampler {self.sampler!r}: 'ddim' for every convention, 'pndm' for diffusers-v2 only.")
    if self.ddim_steps < 2:
      raise ValueError(f'ddim_steps = {self.ddim_steps}: a trajectory needs at least 2 steps.')

  def scheduler(self, scheduler_config) -> DDIM:
    """The sampler on the model's noise schedule. paper and diffusers-v1 fix SD's DDIM timesteps
    (leading spacing, offset 1: [1, 21, …, 981] for 50 steps) whatever the pipeline's own config says."""
    if self.convention == 'diffusers-v2':
      return make_scheduler(scheduler_config, self.sampler)
    return make_scheduler({**scheduler_config, 'timestep_spacing': 'leading', 'steps_offset': 1,
                           'set_alpha_to_one': False}, 'ddim')


TOKEN_EMBEDDING = 'text_model.embeddings.token_embedding.weight'  # the CLIP text encoder's word-embedding table


def encode_embeddings(layout: ParamLayout, encoder: Params, embeds: jax.Array) -> jax.Array:
  """The text conditioning (B, L, D') of word embeddings (B, L, D) instead of token ids: the CLIP text encoder's
  last hidden state, as encode_prompts computes it from the ids whose embeddings these are. The encoder reads
  its table at the ids: a table of exactly these rows, read at 0 … B·L−1, gives the same sum with every row free."""
  b, length, dim = embeds.shape
  module = layout.module({**encoder, TOKEN_EMBEDDING: embeds.reshape(b * length, dim)})
  return module(jnp.arange(b * length, dtype=jnp.int32).reshape(b, length)).last_hidden_state


@dataclasses.dataclass(frozen=True)
class Adversary:
  """Robust erasure's inner search (AdvUnlearn, docs/method.md §9), for each concept's student prompt.

  encoder: the text encoder's flat parameters (held layout), `layout` its structure; embeds (N, L, D): the word
  embeddings of each concept's student prompt; free (N, L, 1): 1 where the search may move an embedding, 0 at the
  start, end and padding tokens. steps, learning_rate: the search's Adam steps (0: plain ESD) and rate. `tokens`:
  0, the search moves the prompt's words; k > 0, it moves k tokens after the start token (the prompt's embeds hold
  k slots there, `free` is 1 on them), which each iteration fills with vocabulary tokens drawn from `candidates`
  (Draws.prefix). The arrays are a pytree's leaves, the rest static.
  """

  encoder: Params
  embeds: jax.Array
  free: jax.Array
  candidates: jax.Array
  layout: ParamLayout
  steps: int
  learning_rate: float
  tokens: int = 0


jax.tree_util.register_dataclass(Adversary, data_fields=['encoder', 'embeds', 'free', 'candidates'],
                                 meta_fields=['layout', 'steps', 'learning_rate', 'tokens'])


class Prompts(NamedTuple):
  """Text conditioning, encoded once. `concept` and `student` have a leading concept axis (N);
  `student[i]` is concept i's erase_from prompt f (with `has_from[i]`), else concept i itself.
  `student` is None when no concept has an erase_from prompt, which saves the frozen model a forward.
  `eta[i]` is concept i's negative guidance; None: the objective's for all. `retain` (leading axis R): the prompts
  to preserve, shared by every concept; None: plain ESD. `adversary`: robust erasure's search; None: plain ESD."""

  uncond: Conditioning
  concept: Conditioning
  student: Conditioning | None
  has_from: jax.Array
  eta: jax.Array | None = None
  retain: Conditioning | None = None
  adversary: Adversary | None = None


class Draws(NamedTuple):
  """One iteration's random draws. `step`: t_enc (paper) or k (diffusers-v1/-v2); `t`: the query timestep;
  `retain`: the index of the retain prompt (unused without retain prompts); `prefix` (k,) in [0, 1): robust
  erasure's prefix tokens, as positions in Adversary.candidates (empty without them)."""

  x_T: jax.Array
  step: jax.Array
  t: jax.Array
  concept: jax.Array
  retain: jax.Array | int = 0
  prefix: jax.Array | float = 0.0


def draw(key: jax.Array, objective: Objective, scheduler, *, batch: int, latent_shape: tuple[int, int, int],
         num_concepts: int, per_step: int = 1, num_retain: int = 0, prefix_tokens: int = 0) -> Draws:
  """Draws as the convention's code draws them (docs/method.md §4): one step and one concept per iteration.

  With per_step = B > 1, B independent draws stacked on a leading axis, for B different concepts (while
  there are that many): `train_step` then averages their losses.
  """
  if per_step > 1:
    k_concepts, *keys = jax.random.split(key, per_step + 1)
    one = functools.partial(draw, objective=objective, scheduler=scheduler, batch=batch,
                            latent_shape=latent_shape, num_concepts=num_concepts, num_retain=num_retain,
                            prefix_tokens=prefix_tokens)
    draws = jax.vmap(one)(jnp.stack(keys))
    if per_step <= num_concepts:
      concepts = jax.random.permutation(k_concepts, num_concepts)[:per_step]
    else:
      concepts = jax.random.randint(k_concepts, (per_step,), 0, num_concepts)
    return draws._replace(concept=concepts.astype(jnp.int32))
  k_noise, k_step, k_t, k_concept = jax.random.split(key, 4)
  n = objective.ddim_steps
  stride = scheduler.num_train_timesteps // n
  x_T = jax.random.normal(k_noise, (batch, *latent_shape), jnp.float32) * scheduler.init_noise_sigma
  concept = jax.random.randint(k_concept, (), 0, num_concepts)
  step = jax.random.randint(k_step, (), *_step_range(objective))
  if objective.convention == 'paper':
    t = stride * step + jax.random.randint(k_t, (), 0, stride)
  elif objective.convention == 'diffusers-v1':
    t = scheduler.num_train_timesteps - stride * step
  else:
    t = scheduler.timestep(step, n)
  # Folded in, not split off: the other draws stay what they were before retain prompts existed.
  retain = jax.random.randint(jax.random.fold_in(key, 1), (), 0, max(num_retain, 1))
  prefix = jax.random.uniform(jax.random.fold_in(key, 2), (prefix_tokens,))
  return Draws(x_T, step.astype(jnp.int32), t.astype(jnp.int32), concept.astype(jnp.int32), retain.astype(jnp.int32),
               prefix)


def _step_range(objective: Objective) -> tuple[int, int]:
  """The values `draw` gives `step` (t_enc or k), each equally likely: [low, high)."""
  n = objective.ddim_steps
  return (1, n - 1) if objective.convention == 'diffusers-v1' else (0, n)


def _sampler_span(objective: Objective, step):
  """(start, stop) of the sampler's steps for a drawn `step` (a traced value or an int)."""
  n = objective.ddim_steps
  return (1, jnp.minimum(n, n + 1 - step)) if objective.convention == 'paper' else (0, step)


def share_timesteps(draws: Draws) -> Draws:
  """Draws of N models (leading axis) that all take model 0's sampler length and query timestep, each
  keeping its own noise. Vmapped, the sampler runs as many steps as the longest trajectory of the batch;
  aligned, no model waits on padded steps (in the paper convention, ~25 steps per model on average instead
  of the maximum of N draws: ~45 for N = 8)."""
  same = lambda a: jnp.broadcast_to(a[:1], a.shape)
  return draws._replace(step=same(draws.step), t=same(draws.t))


def _pick(cond: Conditioning, index, batch: int) -> Conditioning:
  """Row `index` of a stacked Conditioning, repeated over the batch."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a[index], (batch, *a.shape[1:])), cond)


def _cat(*conds: Conditioning) -> Conditioning:
  return jax.tree.map(lambda *a: jnp.concatenate(a), *conds)


def _predict(unet, x, t, cond: Conditioning, dtype) -> jax.Array:
  """The UNet's output in float32, computed in `dtype`, for a batch of latents sharing timestep t."""
  cond = jax.tree.map(lambda a: a.astype(dtype), cond)
  return unet(x.astype(dtype), t, cond.context, cond.added_cond_kwargs()).astype(jnp.float32)


def sample_x_t(objective: Objective, scheduler, unet, x_T: jax.Array, step: jax.Array, uncond: Conditioning,
               cond: Conditioning) -> jax.Array:
  """Runs the guided sampler from x_T and stops where the convention's `step` says (a traced length).

  paper: CompVis' DDIM drops the last timestep (981), starts from x_T as if at 961, and stops right after the
  step whose index + 1 equals t_enc: 50 − t_enc steps, 49 for t_enc ∈ {0, 1}. diffusers-v1/-v2: k steps.
  """
  n = objective.ddim_steps
  dtype = jnp.dtype(objective.compute_dtype)
  both = _cat(uncond, cond)

  def model_fn(x, t):
    e_uncond, e_cond = jnp.split(_predict(unet, jnp.concatenate([x, x]), t, both, dtype), 2)
    return e_uncond + objective.guidance * (e_cond - e_uncond)

  start, stop = _sampler_span(objective, step)
  x_t, _ = scheduler.denoise(model_fn, x_T, n, start=start, stop=stop)
  return jax.lax.stop_gradient(x_t)


def sampler_steps(objective: Objective) -> list[int]:
  """The sampler steps sample_x_t runs for each value `draw` can give `step`, in order (each equally likely)."""
  spans = (_sampler_span(objective, step) for step in range(*_step_range(objective)))
  return [int(stop) - start for start, stop in spans]


def esd_loss(trained: Params, frozen: Params, layout: ParamLayout, objective: Objective, scheduler,
             prompts: Prompts, draws: Draws, preserve_scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(loss, x_t) of one iteration. Gradients flow to `trained` only: the student is the frozen tree with
  the trained subset laid over it, so the base weights are held once. `preserve_scale` multiplies λ (an input, so
  that a run may change it without recompiling)."""
  batch = draws.x_T.shape[0]
  dtype = jnp.dtype(objective.compute_dtype)
  teacher = layout.module(frozen)
  uncond = _pick(prompts.uncond, 0, batch)
  concept = _pick(prompts.concept, draws.concept, batch)
  student_prompt = concept if prompts.student is None else _pick(prompts.student, draws.concept, batch)
  # With a retain prompt r, every model call below also takes (x_r, r) in the same batch.
  sampled = [student_prompt] + ([] if prompts.retain is None else [_pick(prompts.retain, draws.retain, batch)])

  # paper and diffusers-v1 sample with the model being trained (no gradient through sampling), v2 with θ*.
  if objective.convention == 'diffusers-v2':
    sampler = teacher
  else:
    sampler = layout.module({**frozen, **jax.lax.stop_gradient(trained)})
  xs = jnp.split(sample_x_t(objective, scheduler, sampler, jnp.concatenate([draws.x_T] * len(sampled)), draws.step,
                            _cat(*[uncond] * len(sampled)), _cat(*sampled)), len(sampled))
  x_t = xs[0]

  # The frozen model's predictions, in one batched forward: "", c (and f) at x_t, and r at x_r.
  asked = [uncond, concept] + ([student_prompt] if prompts.student is not None else [])
  inputs, conds = [x_t] * len(asked) + xs[1:], asked + sampled[1:]
  e = jnp.split(_predict(teacher, jnp.concatenate(inputs), draws.t, _cat(*conds), dtype), len(conds))
  e_uncond, e_concept = e[0], e[1]
  eta = objective.negative_guidance if prompts.eta is None else prompts.eta[draws.concept]
  if objective.convention == 'diffusers-v2':
    anchor, coefficient = e_concept, eta + 1.0  # that code's η_C = η + 1 with anchor ε*(c): the same target
  else:
    anchor, coefficient = e_uncond, eta
  if prompts.student is not None:
    anchor = jnp.where(prompts.has_from[draws.concept], e[2], anchor)
  target = jax.lax.stop_gradient(anchor - coefficient * (e_concept - e_uncond))

  inputs, concept_terms = list(xs), 1
  if prompts.adversary is not None:  # the student is asked at c + δ, the concept's best restoring perturbation
    restoring = lambda cond: _predict(layout.module({**frozen, **jax.lax.stop_gradient(trained)}), x_t, draws.t,
                                      cond, dtype)
    adversarial = _adversarial(prompts.adversary, draws, student_prompt, restoring, e_concept)
    if prompts.adversary.tokens:  # prefixed: asked at the prompt itself too, or its own prompt is never trained
      sampled, inputs, concept_terms = [student_prompt, adversarial] + sampled[1:], [x_t] + inputs, 2
    else:
      sampled = [adversarial] + sampled[1:]
  student = layout.module({**frozen, **trained})
  student.remat = objective.remat
  e_student = jnp.split(_predict(student, jnp.concatenate(inputs), draws.t, _cat(*sampled), dtype), len(sampled))
  loss = sum(jnp.mean(jnp.square(asked_at - target)) for asked_at in e_student[:concept_terms])
  if prompts.retain is not None:
    retain_error = jnp.mean(jnp.square(e_student[-1] - jax.lax.stop_gradient(e[-1])))
    loss += objective.preserve_weight * preserve_scale * retain_error
  return loss, x_t


def _adversarial(adversary: Adversary, draws: Draws, student_prompt: Conditioning, predict,
                 e_concept: jax.Array) -> Conditioning:
  """AdvUnlearn's attack on the current student (`predict`: its ε at x_t for a conditioning, no gradient to its
  weights): Adam on δ, from 0, lowering mse(ε_θ(x_t, c + δ), ε*(x_t, c)); returns the conditioning the student is
  then asked at. Without prefix tokens it is the student prompt's moved by what δ changes in the text encoder's
  output, so δ = 0 moves it by exactly 0; with them, the prefixed prompt's, its slots filled with the drawn tokens."""
  embeds, free = adversary.embeds[draws.concept][None], adversary.free[draws.concept][None]
  if adversary.tokens:
    drawn = adversary.candidates[(draws.prefix * adversary.candidates.shape[0]).astype(jnp.int32)]
    embeds = embeds.at[:, 1:1 + adversary.tokens].set(adversary.encoder[TOKEN_EMBEDDING][drawn].astype(embeds.dtype))
  batch = e_concept.shape[0]
  encode = lambda delta: encode_embeddings(adversary.layout, adversary.encoder, embeds + free * delta)

  def restore_loss(delta):
    context = encode(delta)
    context = jnp.broadcast_to(context, (batch, *context.shape[1:]))
    return jnp.mean(jnp.square(predict(Conditioning(context)) - e_concept))

  tx = optax.adam(adversary.learning_rate)

  def search_step(_, carry):
    delta, opt_state = carry
    updates, opt_state = tx.update(jax.grad(restore_loss)(delta), opt_state)
    return optax.apply_updates(delta, updates), opt_state

  zero = jnp.zeros_like(embeds)
  delta = jax.lax.stop_gradient(jax.lax.fori_loop(0, adversary.steps, search_step, (zero, tx.init(zero)))[0])
  if adversary.tokens:
    return dataclasses.replace(student_prompt, context=jnp.broadcast_to(encode(delta), student_prompt.context.shape))
  shift = encode(delta) - encode(zero)
  return dataclasses.replace(student_prompt, context=student_prompt.context + shift)


class TrainState(NamedTuple):
  """What changes during training: the trained subset, its Adam state, and the iteration count."""

  step: jax.Array
  trained: Params
  opt_state: optax.OptState


def optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Adam as the paper's code runs it: β = (0.9, 0.999), ε = 1e-8, no decay, schedule, clipping or EMA."""
  return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)


def init_state(trained: Params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), trained, tx.init(trained))


def mean_esd_loss(trained: Params, frozen: Params, layout: ParamLayout, objective: Objective, scheduler,
                  prompts: Prompts, draws: Draws,
                  preserve_scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
  """esd_loss averaged over draws stacked on a leading axis (several concepts in one step)."""
  loss, x_t = jax.vmap(lambda d: esd_loss(trained, frozen, layout, objective, scheduler, prompts, d,
                                          preserve_scale))(draws)
  return loss.mean(), x_t


def train_step(state: TrainState, frozen: Params, prompts: Prompts, draws: Draws, *, layout: ParamLayout,
               objective: Objective, scheduler, tx: optax.GradientTransformation,
               preserve_scale: jax.Array | float = 1.0) -> tuple[TrainState, dict]:
  """One ESD iteration: loss, gradient of the trained subset, one Adam update. Pure; jit it with the
  keyword arguments bound (static, but for preserve_scale: esd_loss's). Draws with a leading axis (draw's
  per_step) average the loss over several concepts."""
  loss_fn = esd_loss if draws.x_T.ndim == 4 else mean_esd_loss
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.trained, frozen, layout, objective, scheduler, prompts, draws, preserve_scale)
  updates, opt_state = tx.update(grads, state.opt_state, state.trained)
  return TrainState(state.step + 1, optax.apply_updates(state.trained, updates), opt_state), {'loss': loss}


def per_model(prompts: Prompts, groups: Sequence[Sequence[int]] | None = None) -> Prompts:
  """The prompts of separate erasures: model m's fields are the concepts `groups[m]` (default: concept m
  alone) on an axis of their own, padded to the largest group by repeating its first (draws pick concept
  indices below the group's size, so padding is never drawn). Under vmap, model m then sees a Prompts of its
  own concepts. The empty prompt and the retain prompts stay shared."""
  if prompts.eta is None:
    raise ValueError('per_model: give every concept its negative guidance (Prompts.eta).')
  if prompts.adversary is not None:
    raise ValueError('per_model: robust erasure (Prompts.adversary) trains one model; erase separately.')
  groups = [[m] for m in range(len(prompts.has_from))] if groups is None else groups
  width = max(len(g) for g in groups)
  index = jnp.asarray([list(g) + [g[0]] * (width - len(g)) for g in groups])
  take = lambda tree: jax.tree.map(lambda a: a[index], tree)
  return Prompts(prompts.uncond, take(prompts.concept), None if prompts.student is None else take(prompts.student),
                 take(prompts.has_from), take(prompts.eta), prompts.retain)


def separate_train_step(state: TrainState, frozen: Params, prompts: Prompts, draws: Draws, active: jax.Array,
                        learning_rate: jax.Array, *, layout: ParamLayout, objective: Objective,
                        scheduler) -> tuple[TrainState, dict]:
  """One iteration of N separate erasures at once (vmap over a leading model axis of `state`, `draws`,
  `per_model(prompts)` and `learning_rate`), all taught by the one shared frozen base; model m's Adam steps
  with learning_rate[m]. A model whose loss is not finite, or that is not `active`, keeps its previous state;
  metrics['active'] says which models stepped."""
  axes = Prompts(None, 0, None if prompts.student is None else 0, 0, 0, None)
  step = lambda s, p, d, lr: train_step(s, frozen, p, d, layout=layout, objective=objective, scheduler=scheduler,
                                        tx=optimizer(lr))
  stepped, metrics = jax.vmap(step, in_axes=(0, axes, 0, 0))(state, prompts, draws, learning_rate)
  ok = active & jnp.isfinite(metrics['loss'])
  keep = lambda new, old: jnp.where(ok.reshape(ok.shape + (1,) * (new.ndim - 1)), new, old)
  return jax.tree.map(keep, stepped, state), {'loss': metrics['loss'], 'active': ok}
