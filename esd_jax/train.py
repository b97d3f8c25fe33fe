"""An ESD erasure run: the objective of esd.py, sharded over a device mesh, checkpointed and resumable.

Re-running the same command in the same workdir resumes from the last checkpoint. The iteration-i draws
come from fold_in(seed, i), so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from tqdm import tqdm

from esd_jax import esd, methods, sharding
from esd_jax.concepts import Concept, ConceptError, by_prompt
from esd_jax.concepts import of_config as concepts_of
from esd_jax.generate import encode_prompts, latent_size
from esd_jax.models.state_dict import split_flat
from esd_jax.pipeline import StableDiffusion


class RunError(RuntimeError):
  """A run cannot start or go on; the message says why and what to do."""


@dataclasses.dataclass
class Erased:
  """The result of a run: the trained tensors (diffusers keys), what produced them, and the base pipeline.

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
  failed: dict[int, str] = dataclasses.field(default_factory=dict)

  def model_concepts(self, m: int) -> list[Concept]:
    return [self.concepts[j] for j in self.groups[m]]

  def models(self) -> list[tuple[int, list[Concept], dict[str, jax.Array]]]:
    """(index, its concepts, trained tensors) of each erased model that finished (one unless separate_models)."""
    if not self.metadata['separate_models']:
      return [(0, self.concepts, self.trained)]
    return [(m, self.model_concepts(m), {k: v[m] for k, v in self.trained.items()})
            for m in range(len(self.groups)) if m not in self.failed]


def concept_list(erase: ml_collections.ConfigDict) -> list[Concept]:
  """The run's concepts (concepts.of_config), a bad list raised as a RunError."""
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


def encode_concepts(pipe: StableDiffusion, concepts: list[Concept], negative_guidance: float, *, height: int,
                    width: int) -> esd.Prompts:
  """Text conditioning of the empty prompt, the concepts and their erase_from prompts, computed once."""
  kwargs = dict(height=height, width=width)
  has_from = [bool(c.erase_from) for c in concepts]
  student = None
  if any(has_from):
    student = encode_prompts(pipe, [c.erase_from or c.prompt for c in concepts], **kwargs)
  eta = [negative_guidance if c.negative_guidance is None else c.negative_guidance for c in concepts]
  return esd.Prompts(uncond=encode_prompts(pipe, [''], **kwargs),
                     concept=encode_prompts(pipe, [c.prompt for c in concepts], **kwargs),
                     student=student, has_from=jnp.asarray(has_from), eta=jnp.asarray(eta, jnp.float32))


def objective_of(erase: ml_collections.ConfigDict, compute_dtype: str) -> esd.Objective:
  return esd.Objective(convention=erase.convention, negative_guidance=erase.negative_guidance,
                       guidance=erase.guidance, ddim_steps=erase.ddim_steps, sampler=erase.sampler,
                       compute_dtype=compute_dtype)


def _fingerprint(frozen: dict[str, jax.Array], keys: list[str]) -> str:
  """Identifies the base weights a run trains, cheaply: per trained tensor, its float64 sum and sum of squares."""
  digest = hashlib.sha256()
  for k in keys:
    x = np.asarray(frozen[k], np.float64)
    digest.update(f'{k}:{x.shape}:{x.sum():.17g}:{np.square(x).sum():.17g};'.encode())
  return digest.hexdigest()[:16]


def run_metadata(config: ml_collections.ConfigDict, pipe: StableDiffusion, keys: list[str],
                 frozen: dict[str, jax.Array]) -> dict[str, Any]:
  """What a checkpoint must agree with to be resumed: model, method, concepts, objective, optimizer, seed."""
  concepts = concept_list(config.erase)
  e, t = config.erase, config.train
  return {
      'model': str(config.model), 'unet_config_sha': hashlib.sha256(
          json.dumps(dict(pipe.unet.config), sort_keys=True).encode()).hexdigest()[:16],
      'base_weights': _fingerprint(frozen, keys), 'method': e.method, 'patterns': list(e.patterns),
      'trained_tensors': len(keys), 'concepts': [c.prompt for c in concepts],
      'erase_from': [c.erase_from for c in concepts],
      'concept_negative_guidance': [c.negative_guidance for c in concepts],
      'concept_learning_rate': [c.learning_rate for c in concepts],  # iterations are not here: a run may be extended
      'separate_models': e.separate_models, 'concepts_per_step': t.concepts_per_step,
      'shared_timesteps': t.shared_timesteps,
      'convention': e.convention, 'negative_guidance': e.negative_guidance, 'guidance': e.guidance,
      'ddim_steps': e.ddim_steps, 'sampler': e.sampler, 'resolution': e.resolution,
      'learning_rate': t.learning_rate, 'batch_size': t.batch_size, 'seed': t.seed,
      'compute_dtype': t.compute_dtype,
  }


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
  differ = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
  if differ:
    lines = '; '.join(f'{k}: checkpoint {a!r}, now {b!r}' for k, (a, b) in sorted(differ.items()))
    raise RunError(f'{directory} holds checkpoints of a different run ({lines}). Resuming would mix two '
                   'erasures: use another --config.workdir, or delete the checkpoints to start over.')


def _writable(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / '.write-test'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise RunError(f'Work directory {workdir} is not writable ({e}); choose another --config.workdir.') from e


def _metrics_log(path: Path, resume_step: int):
  """Appends JSON lines to `path`, first dropping lines past the step being resumed from."""
  if path.exists():
    kept = [line for line in path.read_text().splitlines() if json.loads(line)['step'] <= resume_step]
    path.write_text(''.join(line + '\n' for line in kept))
  return open(path, 'a', buffering=1)


def erase(config: ml_collections.ConfigDict, pipe: StableDiffusion | None = None, *,
          progress: bool = True) -> Erased:
  """Runs (or resumes) the erasure `config` describes and returns the trained tensors.

  One model learns to forget every concept (one drawn per iteration, or train.concepts_per_step of them
  with their losses averaged), or, with erase.separate_models, one model per concept: their trained
  subsets stacked on a leading axis split over the mesh's `concept` axis, trained in one vmapped step that
  shares the frozen base (lines of one concept prompt, e.g. with different erase_from, make one model). Model
  m then draws from seed train.seed + m, exactly as a run of its concept alone with that seed. A model whose
  loss turns non-finite is stopped and reported; the others go on.
  """
  from esd_jax.commands import load_model

  run_start = time.perf_counter()
  workdir = Path(config.workdir)
  _writable(workdir)
  concepts = concept_list(config.erase)
  t, separate = config.train, config.erase.separate_models
  groups = by_prompt(concepts) if separate else [list(range(len(concepts)))]
  n_models = len(groups)
  learning_rates, iterations = model_schedules(concepts, groups, t)
  total = max(iterations)
  if t.concepts_per_step < 1 or (separate and t.concepts_per_step != 1):
    raise RunError(f'train.concepts_per_step = {t.concepts_per_step}: use a positive number of concepts averaged '
                   'per step, and 1 with erase.separate_models (each model erases its own concept).')
  if t.shared_timesteps and not separate:
    raise RunError('train.shared_timesteps aligns the draws of separate models: set erase.separate_models=True, '
                   'or leave train.shared_timesteps=False.')
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.concept)
  if n_models % mesh.shape['concept']:
    raise RunError(f'mesh.concept = {mesh.shape["concept"]} does not divide the {n_models} models of this run; '
                   'choose a concept axis size that divides the number of distinct concepts (with '
                   'erase.separate_models).')
  place = lambda key, shape: jax.sharding.NamedSharding(mesh, sharding.param_spec(shape, mesh, config.mesh.min_shard_size))
  pipe = pipe or load_model(config, sharding=place)

  layout, frozen = split_flat(pipe.unet)
  frozen_sh = sharding.param_shardings(frozen, mesh, config.mesh.min_shard_size)
  frozen = jax.device_put(frozen, frozen_sh)
  keys = methods.trained_keys(frozen, config.erase.method, config.erase.patterns)
  metadata = run_metadata(config, pipe, keys, frozen)

  objective = objective_of(config.erase, t.compute_dtype)
  scheduler = objective.scheduler(pipe.scheduler_config)
  size = config.erase.resolution or None
  h, w = latent_size(pipe, size, size)
  latent_shape = (h, w, pipe.unet.config['in_channels'])
  prompts = encode_concepts(pipe, concepts, objective.negative_guidance, height=size, width=size)
  tx = esd.optimizer(learning_rates[0])  # separate models: each model's own, passed to the step (Adam's state is alike)
  init = functools.partial(esd.init_state, tx=tx)
  step_kwargs = dict(layout=layout, objective=objective, scheduler=scheduler)
  base = {k: frozen[k] for k in keys}

  if separate:
    prompts = esd.per_model(prompts, groups)
    shared, split = sharding.replicated(mesh), sharding.over_models(mesh)
    prompts = jax.device_put(prompts, esd.Prompts(jax.tree.map(lambda _: shared, prompts.uncond),
                                                  *[jax.tree.map(lambda _: split, f) for f in prompts[1:]]))
    trained_sh = {k: sharding.stacked(frozen_sh[k]) for k in keys}
    # Every model starts from the base weights; the broadcast materialises one copy per model.
    trained = jax.jit(lambda p: jax.tree.map(lambda a: jnp.broadcast_to(a, (n_models, *a.shape)), p),
                      out_shardings=trained_sh)(base)
    init = jax.vmap(init)
    draws_sh = esd.Draws(*[sharding.over_models(mesh)] * 4)
    seeds, sizes = jnp.arange(n_models) + t.seed, jnp.asarray([len(g) for g in groups])

    def draw_fn(i):  # model m draws as a run of its concept alone with seed train.seed + m would
      one = lambda seed, size: esd.draw(jax.random.fold_in(jax.random.key(seed), i), objective, scheduler,
                                        batch=t.batch_size, latent_shape=latent_shape, num_concepts=size)
      draws = jax.vmap(one)(seeds, sizes)
      return esd.share_timesteps(draws) if t.shared_timesteps else draws
    step = functools.partial(esd.separate_train_step, **step_kwargs)
    rates = jax.device_put(jnp.asarray(learning_rates, jnp.float32), sharding.over_models(mesh))
  else:
    prompts = jax.device_put(prompts, sharding.replicated(mesh))
    trained_sh = {k: frozen_sh[k] for k in keys}
    # A copy, not the frozen arrays themselves: the train state is donated to each step.
    trained = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=trained_sh)(base)
    per_step = t.concepts_per_step
    batch_sh = sharding.batch_sharding(mesh, t.batch_size, 4 + (per_step > 1), batch_axis=int(per_step > 1))
    draws_sh = esd.Draws(batch_sh, *[sharding.replicated(mesh)] * 3)
    base_key = jax.random.key(t.seed)

    def draw_fn(i):
      return esd.draw(jax.random.fold_in(base_key, i), objective, scheduler, batch=t.batch_size,
                      latent_shape=latent_shape, num_concepts=len(concepts), per_step=per_step)
    step = lambda state, frozen, prompts, draws, active, rates: esd.train_step(state, frozen, prompts, draws, tx=tx,
                                                                               **step_kwargs)
    rates = None

  abstract = jax.eval_shape(init, trained)
  state_sh = sharding.like_params(abstract, trained_sh, mesh)
  state = jax.jit(init, out_shardings=state_sh)(trained)
  active_sh = sharding.replicated(mesh)  # which models train this iteration: n_models booleans, on every device
  failed: dict[int, str] = {}

  ckpt_dir = (workdir / 'checkpoints').resolve()
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint.keep, enable_async_checkpointing=True))
  start = manager.latest_step() or 0
  if start:
    saved = manager.restore(start, args=ocp.args.Composite(run=ocp.args.JsonRestore(),
                                                            failed=ocp.args.JsonRestore()))
    _check_resumable(saved['run'], metadata, ckpt_dir)
    failed = {int(k): v for k, v in saved['failed'].items()}
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    state = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    logging.info('Resumed from step %d of %s', start, ckpt_dir)

  step_fn = jax.jit(step, in_shardings=(state_sh, frozen_sh, jax.tree.map(lambda a: a.sharding, prompts),
                                        draws_sh, active_sh, None if rates is None else rates.sharding),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  draw_fn = jax.jit(draw_fn, out_shardings=draws_sh)

  def save(step: int, state) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               run=ocp.args.JsonSave(metadata),
                                               failed=ocp.args.JsonSave({str(k): v for k, v in failed.items()})),
                 force=True)

  log = _metrics_log(workdir / 'metrics.jsonl', start)
  bar = tqdm(range(start, total), initial=start, total=total, desc='erase', unit='it', disable=not progress)
  try:
    for i in bar:
      draws = draw_fn(i)
      # A model trains until its own iteration count, unless stopped for a non-finite loss.
      active = np.asarray([m not in failed and i < iterations[m] for m in range(n_models)])
      tick = time.perf_counter()
      state, metrics = step_fn(state, frozen, prompts, draws, jax.device_put(active, active_sh), rates)
      losses = np.asarray(metrics['loss']).reshape(-1)  # waits for the step: checked before anything is saved
      if separate:
        stepped = np.asarray(metrics['active'])
        for m in np.flatnonzero(active & ~stepped):
          failed[int(m)] = f'loss {losses[m]} at iteration {i + 1}; stopped, kept iteration {i}'
          logging.warning('Model %d (%r): the loss is %s at iteration %d; stopped it, the others go on.',
                          m, concepts[groups[m][0]].prompt, losses[m], i + 1)
        if len(failed) == n_models:
          raise RunError(f'Iteration {i + 1}: every model has stopped ({failed}). Lower train.learning_rate or '
                         'use train.compute_dtype=float32.')
      elif not math.isfinite(losses[0]):
        manager.wait_until_finished()
        last = manager.latest_step()
        raise RunError(f'Iteration {i + 1}: the loss is {losses[0]}. Stopped before saving it; the last good '
                       f'checkpoint is step {last} in {ckpt_dir}' if last else
                       f'Iteration {i + 1}: the loss is {losses[0]}. Stopped; no checkpoint was written yet.'
                       ' Lower train.learning_rate or use train.compute_dtype=float32.')
      record = {'step': i + 1, 'loss': losses.tolist() if separate else float(losses[0]),
                'seconds': time.perf_counter() - tick}
      if not separate:
        record.update(draw_step=np.asarray(draws.step).tolist(), t=np.asarray(draws.t).tolist(),
                      concept=[concepts[c].prompt for c in np.asarray(draws.concept).reshape(-1)])
      log.write(json.dumps(record) + '\n')
      bar.set_postfix(loss=f'{np.mean(losses[np.isfinite(losses)]):.5f}')  # finite ones: a stopped model's may not be
      if (i + 1) % t.checkpoint_every == 0 or i + 1 == total:
        save(i + 1, state)
  finally:
    bar.close()
    log.close()
    manager.wait_until_finished()
    manager.close()
  return Erased(trained=dict(state.trained), workdir=workdir, pipe=pipe, concepts=concepts, groups=groups,
                learning_rates=learning_rates, iterations=iterations, failed=failed,
                metadata={**metadata, 'iterations': total,
                          'seconds': round(time.perf_counter() - run_start, 1)})
