"""An ESD erasure run: the objective of esd.py, sharded over a device mesh, checkpointed and resumable.

`run_erasure` is five steps: plan (concepts, models, schedules: no model loaded yet), set-up (mesh, frozen
base, trained subset, jitted draw and step), restore, the loop (draws → step → metrics → checkpoint), finish.
One model learns to forget every concept; with erase.separate_models, N models (one per concept) train
together in one vmapped step on a leading model axis that shares the frozen base. The iteration-i draws
come from fold_in(seed, i), so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from esd_jax import distributed, esd, methods, sharding
from esd_jax.checkpoints import Checkpoints
from esd_jax.concepts import Concept, ConceptError, by_prompt
from esd_jax.concepts import of_config as concepts_of
from esd_jax.errors import RunError
from esd_jax.files import SafetensorsReader, tensor_summary, write_json, write_safetensors
from esd_jax.generate import encode_prompts, latent_size
from esd_jax.loading import load_model
from esd_jax.log import log
from esd_jax.metrics import MetricsLog
from esd_jax.models.state_dict import split_flat, stored_tensors
from esd_jax.pipeline import StableDiffusion
from esd_jax.tokenizer import warn_if_cut
from esd_jax.workdir import lock_workdir


@dataclasses.dataclass
class Erased:
  """The result of a run: the trained tensors (diffusers keys, stored layout), what produced them, and the base
  pipeline.

  With erase.separate_models, every tensor has a leading model axis (model m erases the concepts
  `groups[m]`: the lines of one concept prompt, with learning rate `learning_rates[m]` for `iterations[m]`
  iterations) and `failed` maps the index of each model stopped for a non-finite loss to what happened.
  """

  trained: dict[str, jax.Array]
  metadata: dict[str, Any]
  workdir: Path
  pipe: StableDiffusion
  concepts: list[Concept]
  groups: list[list[int]]
  learning_rates: list[float]
  iterations: list[int]
  seconds: float  # the run's wall time; not in metadata, which goes into the weight files (kept reproducible)
  failed: dict[int, str] = dataclasses.field(default_factory=dict)

  def model_concepts(self, m: int) -> list[Concept]:
    return [self.concepts[j] for j in self.groups[m]]

  def models(self) -> list[tuple[int, list[Concept], dict[str, jax.Array]]]:
    """(index, its concepts, trained tensors) of each erased model that finished (one unless separate_models)."""
    if not self.metadata['separate_models']:
      return [(0, self.concepts, self.trained)]
    return [(m, self.model_concepts(m), {k: v[m] for k, v in self.trained.items()})
            for m in range(len(self.groups)) if m not in self.failed]


# --------------------------------------------------------------------------------------------------------------
# Plan: what the run trains, from the config alone.


def concept_list(erase: ml_collections.ConfigDict) -> list[Concept]:
  """The run's concepts (concepts.of_config), a bad list raised as a RunError."""
  if erase.erase_from == 'auto':
    raise RunError("erase.erase_from='auto' stands for the shapes world's prompts naming each concept, which "
                   'esd_jax.commands fills in: run through main.py / esd_jax.commands, or give the prompts.')
  try:
    return concepts_of(erase)
  except ConceptError as e:
    raise RunError(str(e)) from e


def model_schedules(concepts: list[Concept], groups: list[list[int]],
                    train: ml_collections.ConfigDict) -> tuple[list[float], list[int]]:
  """Each model's learning rate and iteration count: its concept lines' own, else train.learning_rate and
  train.iterations; the lines of one model must agree."""
  rates, counts = [], []
  for group in groups:
    lines = [concepts[j] for j in group]
    for field, default, out in (('learning_rate', train.learning_rate, rates), ('iterations', train.iterations, counts)):
      values = sorted({getattr(c, field) for c in lines}, key=str)
      if len(values) > 1:
        one_concept = len({c.prompt for c in lines}) == 1
        whose = (f'The lines of concept {lines[0].prompt!r}' if one_concept else
                 'The concepts of this one-model run (erase.separate_models=False)')
        raise RunError(f'{whose} give different {field}s ({values}), but one model trains with one: give them the '
                       f'same {field}, or leave it empty for train.{field}'
                       + ('.' if one_concept else ', or train one model per concept (erase.separate_models=True).'))
      out.append(default if values[0] is None else values[0])
  return rates, counts


@dataclasses.dataclass(frozen=True)
class Plan:
  concepts: list[Concept]
  groups: list[list[int]]  # the concept lines of each model: all of them for one model
  learning_rates: list[float]
  iterations: list[int]
  separate: bool
  retain: list[str] = dataclasses.field(default_factory=list)  # prompts to preserve (erase.preserve)

  @property
  def total(self) -> int:
    return max(self.iterations)


def plan_run(config: ml_collections.ConfigDict) -> Plan:
  concepts = concept_list(config.erase)
  train, separate = config.train, config.erase.separate_models
  groups = by_prompt(concepts) if separate else [list(range(len(concepts)))]
  learning_rates, iterations = model_schedules(concepts, groups, train)
  if train.concepts_per_step < 1 or (separate and train.concepts_per_step != 1):
    raise RunError(f'train.concepts_per_step = {train.concepts_per_step}: use a positive number of concepts '
                   'averaged per step, and 1 with erase.separate_models (each model erases its own concept).')
  if train.shared_timesteps and not separate:
    raise RunError('train.shared_timesteps aligns the draws of separate models: set erase.separate_models=True, '
                   'or leave train.shared_timesteps=False.')
  return Plan(concepts, groups, learning_rates, iterations, separate, retain_prompts(config.erase, concepts))


def retain_prompts(erase: ml_collections.ConfigDict, concepts: list[Concept]) -> list[str]:
  """erase.preserve, a list of prompts ('auto' is the commands' to resolve: it knows the shapes world)."""
  if erase.preserve == 'auto':
    raise RunError("erase.preserve='auto' stands for the shapes world's prompts, which esd_jax.commands fills in: "
                   'run through main.py / esd_jax.commands, or list the prompts to preserve.')
  return list(erase.preserve)


# --------------------------------------------------------------------------------------------------------------
# Set-up: the frozen base on the mesh, the text conditioning, and the jitted draw and step of the run's models.


def encode_concepts(pipe: StableDiffusion, concepts: list[Concept], negative_guidance: float, *, height: int,
                    width: int, retain: list[str] = ()) -> esd.Prompts:
  """Text conditioning of the empty prompt, the concepts, their erase_from prompts and the retain prompts,
  computed once."""
  size = dict(height=height, width=width)
  has_from = [bool(c.erase_from) for c in concepts]
  warn_if_cut(pipe.tokenizer, [c.prompt for c in concepts] + [c.erase_from for c in concepts if c.erase_from]
              + list(retain))
  student = None
  if any(has_from):
    student = encode_prompts(pipe, [c.erase_from or c.prompt for c in concepts], **size)
  eta = [negative_guidance if c.negative_guidance is None else c.negative_guidance for c in concepts]
  return esd.Prompts(uncond=encode_prompts(pipe, [''], **size),
                     concept=encode_prompts(pipe, [c.prompt for c in concepts], **size),
                     student=student, has_from=jnp.asarray(has_from), eta=jnp.asarray(eta, jnp.float32),
                     retain=encode_prompts(pipe, list(retain), **size) if retain else None)


def frozen_dtype(train: ml_collections.ConfigDict) -> str:
  """The dtype the frozen base is held in: train.frozen_dtype, where 'auto' is the compute dtype. With bfloat16
  compute that changes no number (every layer casts its weights to bfloat16 anyway) and halves the base's memory,
  and no step casts the whole base again."""
  return train.compute_dtype if train.frozen_dtype == 'auto' else train.frozen_dtype


def objective_of(erase: ml_collections.ConfigDict, train: ml_collections.ConfigDict) -> esd.Objective:
  return esd.Objective(convention=erase.convention, negative_guidance=erase.negative_guidance,
                       guidance=erase.guidance, ddim_steps=erase.ddim_steps, sampler=erase.sampler,
                       compute_dtype=train.compute_dtype, remat=train.remat,
                       preserve_weight=erase.preserve_weight)


def _fingerprint(base: dict[str, jax.Array], keys: list[str]) -> str:
  """Identifies the base weights a run trains, cheaply: per trained tensor, its float64 sum and sum of squares."""
  digest = hashlib.sha256()
  for k in keys:
    digest.update(tensor_summary(k, distributed.gather(base[k])))  # one at a time, gathered from every process
  return digest.hexdigest()[:16]


def run_metadata(config: ml_collections.ConfigDict, plan: Plan, pipe: StableDiffusion, keys: list[str],
                 base: dict[str, jax.Array]) -> dict[str, Any]:
  """What a checkpoint must agree with to be resumed (checkpoints.RESUMABLE lists what may change)."""
  erase, train = config.erase, config.train
  concepts = plan.concepts
  return {
      'model': str(config.model), 'unet_config_sha': hashlib.sha256(
          json.dumps(dict(pipe.unet.config), sort_keys=True).encode()).hexdigest()[:16],
      'base_weights': _fingerprint(base, keys), 'method': erase.method, 'patterns': list(erase.patterns),
      'trained_tensors': len(keys), 'concepts': [c.prompt for c in concepts],
      'erase_from': [c.erase_from for c in concepts],
      'concept_negative_guidance': [c.negative_guidance for c in concepts],
      'concept_learning_rate': [c.learning_rate for c in concepts],  # iterations are not here: a run may be extended
      'separate_models': erase.separate_models, 'concepts_per_step': train.concepts_per_step,
      'shared_timesteps': train.shared_timesteps,
      'convention': erase.convention, 'negative_guidance': erase.negative_guidance, 'guidance': erase.guidance,
      'ddim_steps': erase.ddim_steps, 'sampler': erase.sampler, 'resolution': erase.resolution,
      'learning_rate': train.learning_rate, 'batch_size': train.batch_size, 'seed': train.seed,
      'compute_dtype': train.compute_dtype, 'frozen_dtype': frozen_dtype(train),
      'preserve': plan.retain, 'preserve_weight': erase.preserve_weight if plan.retain else None,
      # only when on, so that the checkpoints of runs without it resume as they did
      **({'adversarial_steps': erase.adversarial_steps, 'adversarial_learning_rate': erase.adversarial_learning_rate,
          **({'adversarial_tokens': erase.adversarial_tokens} if erase.get('adversarial_tokens') else {})}
         if erase.get('adversarial') else {}),
  }


class Models(NamedTuple):
  """The run's trainable side: its initial state (and placement), the iteration-i draws, and one step.

  step(state, draws, active, settle) → (state, losses, stepped): each model steps with its learning rate and λ
  times the Settle's factors; losses and stepped are host arrays over the models (one entry for a one-model run);
  a model that did not step keeps its state. lower() lowers the jitted step for the initial state and an
  iteration's draws (what esd_jax.cost compiles and accounts for).
  """

  state: esd.TrainState
  state_sharding: Any
  draw: Callable[[int], esd.Draws]
  step: Callable[[esd.TrainState, esd.Draws, np.ndarray], tuple[esd.TrainState, np.ndarray, np.ndarray]]
  lower: Callable[[], jax.stages.Lowered]


@dataclasses.dataclass(frozen=True)
class Setup:
  """What both model layouts share: the mesh, the frozen base and the trained keys, the objective, the prompts.
  `base` holds the trained keys' original float32 tensors (where the trained subset starts); `frozen` is the
  whole base in train.frozen_dtype (the same arrays when that is float32)."""

  mesh: jax.sharding.Mesh
  layout: Any
  frozen: dict[str, jax.Array]
  base: dict[str, jax.Array]
  frozen_sharding: dict[str, jax.sharding.NamedSharding]
  keys: list[str]
  objective: esd.Objective
  scheduler: Any
  prompts: esd.Prompts
  latent_shape: tuple[int, int, int]
  batch: int
  abstract: bool = False  # shapes and shardings only (esd_jax.cost): nothing is computed or allocated

  def run(self, jitted, *args):
    """jitted(*args); with an abstract set-up, the shapes and shardings of its outputs."""
    return jitted.eval_shape(*args) if self.abstract else jitted(*args)

  def place(self, tree, shardings):
    """tree on the devices of `shardings`; with an abstract set-up, its shapes with those shardings."""
    if self.abstract:
      return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)
    return jax.tree.map(distributed.put, tree, shardings)

  @property
  def step_kwargs(self) -> dict:
    return dict(layout=self.layout, objective=self.objective, scheduler=self.scheduler)

  def draw_one(self, key, num_concepts, per_step: int = 1) -> esd.Draws:
    num_retain = 0 if self.prompts.retain is None else len(self.prompts.retain.context)
    prefix = 0 if self.prompts.adversary is None else self.prompts.adversary.tokens
    return esd.draw(key, self.objective, self.scheduler, batch=self.batch, latent_shape=self.latent_shape,
                    num_concepts=num_concepts, per_step=per_step, num_retain=num_retain, prefix_tokens=prefix)

  def initial_state(self, trained, trained_sharding, init) -> tuple[esd.TrainState, Any]:
    state_sharding = sharding.like_params(jax.eval_shape(init, trained), trained_sharding, self.mesh)
    return self.run(jax.jit(init, out_shardings=state_sharding), trained), state_sharding


def one_model(setup: Setup, plan: Plan, train: ml_collections.ConfigDict) -> Models:
  """One model erasing every concept: a concept drawn per iteration (or concepts_per_step, losses averaged)."""
  mesh, per_step = setup.mesh, train.concepts_per_step
  trained_sh = {k: setup.frozen_sharding[k] for k in setup.keys}
  # A copy, not the frozen arrays themselves: the train state is donated to each step.
  trained = setup.run(jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=trained_sh), setup.base)
  # Adam's state does not depend on the learning rate, which the step takes as an input.
  init = functools.partial(esd.init_state, tx=esd.optimizer(plan.learning_rates[0]))
  state, state_sh = setup.initial_state(trained, trained_sh, init)
  prompts = distributed.gather(setup.prompts)
  prompts = setup.place(prompts, jax.tree.map(lambda _: sharding.replicated(mesh), prompts))
  batch_sh = sharding.batch_sharding(mesh, train.batch_size, 4 + (per_step > 1), batch_axis=int(per_step > 1))
  draws_sh = esd.Draws(batch_sh, *[sharding.replicated(mesh)] * (len(esd.Draws._fields) - 1))
  base_key = jax.random.key(train.seed)
  draw = jax.jit(lambda i: setup.draw_one(jax.random.fold_in(base_key, i), len(plan.concepts), per_step),
                 out_shardings=draws_sh)

  def train_step(state, frozen, prompts, draws, learning_rate, preserve_scale):  # inputs: erase-until settles them
    return esd.train_step(state, frozen, prompts, draws, tx=esd.optimizer(learning_rate),
                          preserve_scale=preserve_scale, **setup.step_kwargs)
  step_fn = jax.jit(train_step, in_shardings=(state_sh, setup.frozen_sharding,
                                              jax.tree.map(lambda a: a.sharding, prompts), draws_sh,
                                              sharding.replicated(mesh), sharding.replicated(mesh)),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  scalars = functools.cache(  # placed once per settle
      lambda settle: [distributed.put(np.float32(v), sharding.replicated(mesh))
                      for v in (plan.learning_rates[0] * settle.learning_rate, settle.preserve_weight)])

  def step(state, draws, active, settle):
    state, metrics = step_fn(state, setup.frozen, prompts, draws, *scalars(settle))
    losses = np.asarray(metrics['loss']).reshape(1)
    return state, losses, np.isfinite(losses)
  return Models(state, state_sh, draw, step,
                lambda: step_fn.lower(state, setup.frozen, prompts, draw.eval_shape(0), *scalars(Settle())))


def separate_models(setup: Setup, plan: Plan, train: ml_collections.ConfigDict) -> Models:
  """N models, model m erasing the concepts plan.groups[m] as a run of them alone with seed train.seed + m
  would: trained tensors and Adam state stacked on a leading axis split over the mesh's `concept` axis."""
  mesh, n_models = setup.mesh, len(plan.groups)
  shared, split = sharding.replicated(mesh), sharding.over_models(mesh)
  prompts = distributed.gather(setup.run(jax.jit(functools.partial(esd.per_model, groups=plan.groups)),
                                         setup.prompts))
  model_fields = [jax.tree.map(lambda _: split, f) for f in prompts[1:5]]  # concept, student, has_from, eta
  prompts = setup.place(prompts, esd.Prompts(jax.tree.map(lambda _: shared, prompts.uncond), *model_fields,
                                             jax.tree.map(lambda _: shared, prompts.retain)))
  trained_sh = {k: sharding.stacked(setup.frozen_sharding[k]) for k in setup.keys}
  # Every model starts from the base weights; the broadcast materialises one copy per model.
  trained = setup.run(jax.jit(lambda p: jax.tree.map(lambda a: jnp.broadcast_to(a, (n_models, *a.shape)), p),
                              out_shardings=trained_sh), setup.base)
  # Adam's state does not depend on the learning rate: each model's own is passed to the step.
  init = jax.vmap(functools.partial(esd.init_state, tx=esd.optimizer(plan.learning_rates[0])))
  state, state_sh = setup.initial_state(trained, trained_sh, init)
  rates = setup.place(np.asarray(plan.learning_rates, np.float32), split)
  seeds, sizes = jnp.arange(n_models) + train.seed, jnp.asarray([len(g) for g in plan.groups])

  def draw_all(i):
    one = lambda seed, size: setup.draw_one(jax.random.fold_in(jax.random.key(seed), i), size)
    draws = jax.vmap(one)(seeds, sizes)
    return esd.share_timesteps(draws) if train.shared_timesteps else draws
  draws_sh = esd.Draws(*[split] * len(esd.Draws._fields))
  draw = jax.jit(draw_all, out_shardings=draws_sh)
  step_fn = jax.jit(functools.partial(esd.separate_train_step, **setup.step_kwargs),
                    in_shardings=(state_sh, setup.frozen_sharding, jax.tree.map(lambda a: a.sharding, prompts),
                                  draws_sh, shared, split),
                    out_shardings=(state_sh, shared), donate_argnums=(0,))

  def step(state, draws, active, settle):
    if settle != Settle():  # settles come from a probe, which run_erasure allows one model only
      raise RunError('A probe (erase until) measures one model: set erase.separate_models=False.')
    state, metrics = step_fn(state, setup.frozen, prompts, draws, distributed.put(active, shared), rates)
    return state, np.asarray(metrics['loss']).reshape(-1), np.asarray(metrics['active'])
  lower = lambda: step_fn.lower(state, setup.frozen, prompts, draw.eval_shape(0),
                                jax.ShapeDtypeStruct((n_models,), jnp.bool_, sharding=shared), rates)
  return Models(state, state_sh, draw, step, lower)


def run_mesh(config: ml_collections.ConfigDict, plan: Plan) -> jax.sharding.Mesh:
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.concept)
  if len(plan.groups) % mesh.shape['concept']:
    raise RunError(f'mesh.concept = {mesh.shape["concept"]} does not divide the {len(plan.groups)} models of this '
                   'run; choose a concept axis size that divides the number of distinct concepts (with '
                   'erase.separate_models).')
  return mesh


def make_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, unet, prompts: esd.Prompts,
               scheduler_config, latent_shape: tuple[int, int, int], *, abstract: bool = False) -> Setup:
  """The shared set-up around `unet` (its parameters on the mesh already, or abstract)."""
  layout, params = split_flat(unet)
  frozen_sh = sharding.param_shardings(params, mesh, config.mesh.min_shard_size)
  keys = methods.trained_keys(params, config.erase.method, config.erase.patterns)
  objective = objective_of(config.erase, config.train)
  setup = Setup(mesh, layout, params, {}, frozen_sh, keys, objective, objective.scheduler(scheduler_config), prompts,
                latent_shape, config.train.batch_size, abstract)
  params = setup.place(params, frozen_sh)
  dtype = jnp.dtype(frozen_dtype(config.train))
  frozen = params if dtype == jnp.float32 else setup.run(
      jax.jit(lambda p: jax.tree.map(lambda a: a.astype(dtype), p), out_shardings=frozen_sh), params)
  return dataclasses.replace(setup, frozen=frozen, base={k: params[k] for k in keys})


def set_up(config: ml_collections.ConfigDict, plan: Plan, pipe: StableDiffusion | None
           ) -> tuple[StableDiffusion, Setup, dict[str, Any]]:
  """Loads the model onto the mesh (unless given) and returns it, the shared set-up and the run's metadata."""
  mesh = run_mesh(config, plan)
  place = lambda key, shape: jax.sharding.NamedSharding(mesh, sharding.param_spec(shape, mesh,
                                                                                  config.mesh.min_shard_size))
  pipe = pipe or load_model(config, sharding=place)
  size = config.erase.resolution or None
  h, w = latent_size(pipe, size, size)
  prompts = encode_concepts(pipe, plan.concepts, config.erase.negative_guidance, height=size, width=size,
                            retain=plan.retain)
  if config.erase.get('adversarial'):  # robust erasure: the search's text encoder and prompts (esd_jax.attack)
    from esd_jax.attack import adversary_of
    prompts = prompts._replace(adversary=adversary_of(pipe, plan, config.erase))
  setup = make_setup(config, mesh, pipe.unet, prompts, pipe.scheduler_config,
                     (h, w, pipe.unet.config['in_channels']))
  if frozen_dtype(config.train) != 'float32':
    # The float32 UNet goes to host memory (for the export); the devices keep the frozen copy and the trained subset.
    pipe = dataclasses.replace(pipe, unet=distributed.on_host(pipe.unet))
  return pipe, setup, run_metadata(config, plan, pipe, setup.keys, setup.base)


# --------------------------------------------------------------------------------------------------------------
# Erase until: a probe measures the model being trained every few iterations; the run stops when its criteria
# hold and otherwise ends with the best model it measured.


@dataclasses.dataclass(frozen=True)
class Reading:
  """What a probe measured of the model being trained: numbers for metrics.jsonl, whether the run's stop criteria
  hold, and the trade-off that ranks checkpoints (lower is better)."""

  numbers: dict[str, float]
  met: bool
  score: float
  concept_gone: bool = False  # the erased concept no longer shown, whatever the others' state


class Settle(NamedTuple):
  """Factors of the learning rate and of the retain loss's λ (1: unchanged)."""

  learning_rate: float = 1.0
  preserve_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Probe:
  """Measures the trained tensors (held layout, as the step trains them) every `every` iterations and at the end.
  esd_jax.shapes_world.probe has the shapes world's (a classifier); a CLIP zero-shot judge for real models fits
  the same call."""

  every: int
  measure: Callable[[dict[str, jax.Array]], Reading]
  # From the first reading that finds the concept gone (the others not yet whole), the run trains with its learning
  # rate and its retain loss's λ multiplied by these: the balance shifts from erasing to repairing.
  settle: Settle = Settle()


class _Best:
  """The best-scored measurement of a run and its trained tensors, kept in workdir/probe (best.json and
  best.safetensors, stored layout), so that a resumed run knows it; `met` once a measurement met the criteria;
  `settled`, the iteration whose reading first found the concept gone (settled.json), from which the run trains
  with the probe's settle factors. Every process keeps the same record (each measured alike), so all take the same
  branches and collectives."""

  def __init__(self, folder: Path):
    self.folder = folder
    read = lambda name: json.loads((folder / name).read_text()) if (folder / name).is_file() else None
    self.record, settled = read('best.json'), read('settled.json')
    self.settled = settled and settled['step']

  def forget(self) -> None:
    """A run starting afresh: a probe folder left by an earlier run is not this run's (nor, once deleted, a resume's
    of this run before its first reading)."""
    self.record = self.settled = None
    if distributed.is_main():
      for name in ('best.json', 'best.safetensors', 'settled.json'):
        (self.folder / name).unlink(missing_ok=True)

  def settle(self, step: int) -> None:
    self.settled = step
    if distributed.is_main():
      self.folder.mkdir(parents=True, exist_ok=True)
      write_json(self.folder / 'settled.json', {'step': step})

  @property
  def met(self) -> bool:
    return bool(self.record and self.record['met'])

  def offer(self, step: int, reading: Reading, trained: dict[str, jax.Array]) -> None:
    """Keeps the reading if it is the first, meets the criteria (the run stops there) or scores better."""
    if not (self.record is None or reading.met or reading.score < self.record['score']):
      return
    tensors = distributed.gather(stored_tensors(trained))  # every process takes part; process 0 writes
    self.record = {'step': step, 'score': reading.score, 'met': reading.met, **reading.numbers}
    if distributed.is_main():
      self.folder.mkdir(parents=True, exist_ok=True)
      write_safetensors(self.folder / 'best.safetensors', tensors)
      write_json(self.folder / 'best.json', self.record)

  def trained(self) -> dict[str, np.ndarray]:
    """The best model's trained tensors, stored layout."""
    distributed.barrier('probe: best written')  # process 0 wrote them
    with SafetensorsReader(self.folder / 'best.safetensors') as tensors:
      return {k: np.asarray(v()) for k, v in tensors.items()}


def _measure(probe: Probe, best: _Best, state, step: int, metrics: MetricsLog) -> bool:
  """Probes the state of iteration `step`, logs and ranks the reading, settles the run the first time the
  concept is gone; True when the criteria hold."""
  tick = time.perf_counter()
  reading = probe.measure(state.trained)
  metrics.write({'event': 'probe', 'step': step, **reading.numbers, 'score': reading.score, 'met': reading.met,
                 'seconds': round(time.perf_counter() - tick, 2)})
  log.info('probe at iteration %d: %s%s', step, ', '.join(f'{k} {v:.3f}' for k, v in reading.numbers.items()),
           ' — criteria met, stopping' if reading.met else '')
  best.offer(step, reading, state.trained)
  if reading.concept_gone and not reading.met and not best.settled and probe.settle != Settle():
    best.settle(step)
    metrics.write({'event': 'settled', 'step': step, **probe.settle._asdict()})
    log.info('probe at iteration %d: the concept is gone; learning rate × %g and λ × %g from here', step,
             *probe.settle)
  return reading.met


# --------------------------------------------------------------------------------------------------------------
# The run.


def _record(i: int, plan: Plan, draws: esd.Draws, losses: np.ndarray, seconds: float) -> dict:
  """The metrics line of iteration i + 1: the loss(es) and, for one model, what was drawn."""
  if plan.separate:  # the models' draws lie on their own devices (maybe other processes'): losses only
    return {'step': i + 1, 'loss': losses.tolist(), 'seconds': seconds}
  return {'step': i + 1, 'loss': float(losses[0]), 'seconds': seconds, 'draw_step': np.asarray(draws.step).tolist(),
          't': np.asarray(draws.t).tolist(),
          'concept': [plan.concepts[c].prompt for c in np.asarray(draws.concept).reshape(-1)]}


def _stop_failed(i: int, plan: Plan, losses, active, stepped, failed: dict[int, str], checkpoints: Checkpoints):
  """Records models whose loss turned non-finite at iteration i + 1; stops the run when none is left."""
  for m in np.flatnonzero(active & ~stepped):
    failed[int(m)] = f'loss {losses[m]} at iteration {i + 1}; stopped, kept iteration {i}'
    if plan.separate:
      log.warning('Model %d (%r): the loss is %s at iteration %d; stopped it, the others go on.',
                  m, plan.concepts[plan.groups[m][0]].prompt, losses[m], i + 1)
  if len(failed) == len(plan.groups):
    last = checkpoints.last_complete()
    where = (f'the last good checkpoint is step {last} in {checkpoints.directory}' if last else
             'no checkpoint was written yet')
    what = f'the loss is {losses[0]}' if not plan.separate else f'every model has stopped ({failed})'
    raise RunError(f'Iteration {i + 1}: {what}. Stopped before saving it; {where}. Lower train.learning_rate (or '
                   'use train.compute_dtype=float32) and run the same command again: it resumes from that '
                   'checkpoint with the new learning rate, Adam\'s moments carried over.')


def run_erasure(config: ml_collections.ConfigDict, pipe: StableDiffusion | None = None, *,
                progress: bool = True, stop: threading.Event | None = None,
                on_iteration: Callable[[dict], None] | None = None,
                probe: Callable[[StableDiffusion], Probe] | None = None) -> Erased:
  """Runs (or resumes) the erasure `config` describes and returns the trained tensors.

  Model m of a separate-models run draws from seed train.seed + m, exactly as a run of its concept alone with
  that seed; a model whose loss turns non-finite is stopped and reported, the others go on.

  For a caller that drives the run from another thread (a server): setting `stop` acts as Ctrl-C does (the run
  stops after the iteration in progress, saves a checkpoint and raises the "Interrupted" RunError, exit code 130;
  the same config resumes it), and `on_iteration` receives each iteration's metrics record (the metrics.jsonl line:
  step, loss, seconds, …) with the run's `total` iterations added.

  Erase until: `probe(pipe)` builds a Probe on the loaded pipeline; the run then measures its model every
  probe.every iterations and at the end, stops as soon as a measurement meets the probe's criteria (train.iterations
  is then the most it runs), and otherwise returns the best-scored model it measured (workdir/probe/best.json says
  which). One model only.
  """
  run_start = time.perf_counter()
  workdir = Path(config.workdir)
  plan = plan_run(config)
  # One run per workdir: process 0 holds the lock for all (the others share the workdir, as orbax does).
  with lock_workdir(workdir, 'erase') if distributed.is_main() else contextlib.nullcontext():
    if probe is not None and plan.separate:
      raise RunError('A probe (erase until) measures one model: run each concept on its own, or set '
                     'erase.separate_models=False.')
    pipe, setup, metadata = set_up(config, plan, pipe)
    watch = probe(pipe) if probe is not None else None
    best = _Best(workdir / 'probe')
    build = separate_models if plan.separate else one_model
    models = build(setup, plan, config.train)
    checkpoints = Checkpoints(workdir / 'checkpoints', keep=config.checkpoint.keep)
    metrics = MetricsLog(workdir / 'metrics.jsonl', enabled=distributed.is_main())
    try:
      restored = checkpoints.restore(models.state, models.state_sharding, metadata)
      metadata = restored.metadata
      if not restored.step:
        best.forget()
      metrics.open(resume_step=restored.step)
      if restored.change:
        metrics.write({'event': 'learning_rate_changed', **restored.change})
      state, failed = restored.state, restored.failed
      if not (watch and best.met):  # a run that met its criteria is done
        state, failed = _loop(plan, models, state, failed, restored.step, checkpoints, metrics, metadata,
                              every=config.train.checkpoint_every, progress=progress, stop=stop,
                              on_iteration=on_iteration, probe=watch, best=best)
    finally:
      metrics.close()
      checkpoints.close()
  # A probed run returns the model it measured best (none measured: a run already complete when the probe came).
  measured = watch is not None and best.record is not None
  trained = best.trained() if measured else stored_tensors(state.trained, stacked=int(plan.separate))
  probed = {'probe': best.record} if measured else {}  # the measurement the exported model is
  return Erased(trained=trained, workdir=workdir, pipe=pipe, concepts=plan.concepts, groups=plan.groups,
                learning_rates=plan.learning_rates, iterations=plan.iterations, failed=failed,
                metadata={**metadata, 'iterations': plan.total, **probed},
                seconds=round(time.perf_counter() - run_start, 1))


@contextlib.contextmanager
def _stop_requests(requested: threading.Event | None = None) -> Iterator[threading.Event]:
  """Ctrl-C (SIGINT) during the loop asks it to stop after the iteration in progress, so that it can save a
  checkpoint first (a KeyboardInterrupt inside orbax's save would leave it half-done); a second Ctrl-C interrupts
  at once. `requested`, when given, is the event set (by the caller too: its own stop button)."""
  requested = requested or threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield requested
    return
  previous = signal.getsignal(signal.SIGINT)

  def handler(signum, frame):
    if requested.is_set():
      raise KeyboardInterrupt
    requested.set()
    log.warning('Ctrl-C: stopping after this iteration, with a checkpoint (Ctrl-C again to stop at once).')
  signal.signal(signal.SIGINT, handler)
  try:
    yield requested
  finally:
    signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _collectives_failing(checkpoints: Checkpoints, iteration: Callable[[], int]) -> Iterator[None]:
  """In a multi-process run, a runtime error of JAX's is almost always a collective whose peer has gone (a process
  killed, a host lost): say so, with the way back (JAX's coordination service then names the lost process as it
  shuts down)."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    first = str(e).strip().splitlines()[0][:300]
    raise RunError(f'Iteration {iteration() + 1}: a collective across the {jax.process_count()} processes failed '
                   f'({first}). Another process of this run has most likely stopped: see its log, then start every '
                   f'process again with the same command; the run resumes from the last checkpoint in '
                   f'{checkpoints.directory}.') from e


def _loop(plan: Plan, models: Models, state, failed, start: int, checkpoints: Checkpoints, metrics: MetricsLog,
          metadata: dict, *, every: int, progress: bool, stop: threading.Event | None = None,
          on_iteration: Callable[[dict], None] | None = None, probe: Probe | None = None, best: _Best | None = None):
  """Iterations start … plan.total: draws, step, metrics, a checkpoint every `every` and at the end (and when
  Ctrl-C or `stop` asks the run to stop); `on_iteration` gets each metrics record, with the run's total. With a
  probe, a measurement every probe.every iterations and at the end; one that meets its criteria ends the run."""
  bar = tqdm(range(start, plan.total), initial=start, total=plan.total, desc='erase', unit='it',
             disable=not (progress and distributed.is_main()))
  i = start
  with _stop_requests(stop) as stop, contextlib.closing(bar), _collectives_failing(checkpoints, lambda: i):
    for i in bar:
      draws = models.draw(i)
      # A model trains until its own iteration count, unless stopped for a non-finite loss.
      active = np.asarray([m not in failed and i < plan.iterations[m] for m in range(len(plan.groups))])
      tick = time.perf_counter()
      settle = probe.settle if probe is not None and best.settled else Settle()
      # Host values: checked before anything is saved.
      state, losses, stepped = models.step(state, draws, active, settle)
      _stop_failed(i, plan, losses, active, stepped, failed, checkpoints)
      record = _record(i, plan, draws, losses, time.perf_counter() - tick)
      metrics.write(record)
      if on_iteration is not None:
        on_iteration({**record, 'total': plan.total})
      bar.set_postfix(loss=f'{np.mean(losses[np.isfinite(losses)]):.5f}')  # finite ones: a stopped model's may not be
      done = probe is not None and ((i + 1) % probe.every == 0 or i + 1 == plan.total) and _measure(
          probe, best, state, i + 1, metrics)
      if (i + 1) % every == 0 or i + 1 == plan.total or stop.is_set() or done:
        checkpoints.save(i + 1, state, metadata, failed)
      if done:
        break
      if stop.is_set() and i + 1 < plan.total:
        checkpoints.wait()
        raise RunError(f'Interrupted: stopped after iteration {i + 1} of {plan.total} and saved checkpoint step {i + 1} '
                       f'in {checkpoints.directory}: run the same command again to resume from it.', exit_code=130)
  return state, failed
