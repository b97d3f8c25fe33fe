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
from esd_jax.generate import encode_prompts, latent_size
from esd_jax.models.state_dict import split_flat
from esd_jax.pipeline import StableDiffusion


class RunError(RuntimeError):
  """A run cannot start or go on; the message says why and what to do."""


@dataclasses.dataclass
class Erased:
  """The result of a run: the trained tensors (diffusers keys), what produced them, and the base pipeline."""

  trained: dict[str, jax.Array]
  metadata: dict[str, Any]
  workdir: Path
  pipe: StableDiffusion


def concept_list(erase: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """Concepts and their erase_from prompts ('' for none), checked."""
  concepts = [erase.concepts] if isinstance(erase.concepts, str) else list(erase.concepts)
  concepts = [c.strip() for c in concepts]
  if not concepts or any(not c for c in concepts):
    raise RunError(f'erase.concepts = {erase.concepts!r}: every concept must be a non-empty prompt, e.g. '
                   "--config.erase.concepts=\"('Van Gogh',)\".")
  froms = [erase.erase_from] * len(concepts) if isinstance(erase.erase_from, str) else list(erase.erase_from)
  if len(froms) != len(concepts):
    raise RunError(f'erase.erase_from has {len(froms)} entries for {len(concepts)} concepts; give one per '
                   'concept, or a single string for all.')
  return concepts, [f.strip() for f in froms]


def encode_concepts(pipe: StableDiffusion, concepts: list[str], erase_from: list[str], *, height: int,
                    width: int) -> esd.Prompts:
  """Text conditioning of the empty prompt, the concepts and their erase_from prompts, computed once."""
  kwargs = dict(height=height, width=width)
  has_from = [bool(f) and f != c for c, f in zip(concepts, erase_from)]
  student = None
  if any(has_from):
    student = encode_prompts(pipe, [f if h else c for c, f, h in zip(concepts, erase_from, has_from)], **kwargs)
  return esd.Prompts(uncond=encode_prompts(pipe, [''], **kwargs), concept=encode_prompts(pipe, concepts, **kwargs),
                     student=student, has_from=jnp.asarray(has_from))


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
  concepts, erase_from = concept_list(config.erase)
  e, t = config.erase, config.train
  return {
      'model': str(config.model), 'unet_config_sha': hashlib.sha256(
          json.dumps(dict(pipe.unet.config), sort_keys=True).encode()).hexdigest()[:16],
      'base_weights': _fingerprint(frozen, keys), 'method': e.method, 'patterns': list(e.patterns),
      'trained_tensors': len(keys), 'concepts': concepts, 'erase_from': erase_from,
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
  """Runs (or resumes) the erasure `config` describes and returns the trained tensors."""
  from esd_jax.commands import load_model

  workdir = Path(config.workdir)
  _writable(workdir)
  concepts, erase_from = concept_list(config.erase)
  t = config.train
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
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
  prompts = jax.device_put(encode_concepts(pipe, concepts, erase_from, height=size, width=size),
                           sharding.replicated(mesh))
  tx = esd.optimizer(t.learning_rate)

  trained_sh = {k: frozen_sh[k] for k in keys}
  # A copy, not the frozen arrays themselves: the train state is donated to each step.
  trained = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=trained_sh)({k: frozen[k] for k in keys})
  abstract = jax.eval_shape(functools.partial(esd.init_state, tx=tx), trained)
  state_sh = sharding.like_params(abstract, trained_sh, mesh)
  state = jax.jit(functools.partial(esd.init_state, tx=tx), out_shardings=state_sh)(trained)

  ckpt_dir = (workdir / 'checkpoints').resolve()
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint.keep, enable_async_checkpointing=True))
  start = manager.latest_step() or 0
  if start:
    saved = manager.restore(start, args=ocp.args.Composite(run=ocp.args.JsonRestore()))['run']
    _check_resumable(saved, metadata, ckpt_dir)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    state = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    logging.info('Resumed from step %d of %s', start, ckpt_dir)

  draws_sh = esd.Draws(sharding.batch_sharding(mesh, t.batch_size, 4), *[sharding.replicated(mesh)] * 3)
  step_fn = jax.jit(
      functools.partial(esd.train_step, layout=layout, objective=objective, scheduler=scheduler, tx=tx),
      in_shardings=(state_sh, frozen_sh, sharding.replicated(mesh), draws_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  draw_fn = jax.jit(functools.partial(esd.draw, objective=objective, scheduler=scheduler, batch=t.batch_size,
                                      latent_shape=(h, w, pipe.unet.config['in_channels']),
                                      num_concepts=len(concepts)), out_shardings=draws_sh)
  base_key = jax.random.key(t.seed)

  def save(step: int, state) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               run=ocp.args.JsonSave(metadata)), force=True)

  log = _metrics_log(workdir / 'metrics.jsonl', start)
  bar = tqdm(range(start, t.iterations), initial=start, total=t.iterations, desc='erase', unit='it',
             disable=not progress)
  try:
    for i in bar:
      draws = draw_fn(jax.random.fold_in(base_key, i))
      tick = time.perf_counter()
      state, metrics = step_fn(state, frozen, prompts, draws)
      loss = float(metrics['loss'])  # waits for the step: the loss is checked before anything is saved
      if not math.isfinite(loss):
        manager.wait_until_finished()
        last = manager.latest_step()
        raise RunError(f'Iteration {i + 1}: the loss is {loss}. Stopped before saving it; the last good '
                       f'checkpoint is step {last} in {ckpt_dir}' if last else
                       f'Iteration {i + 1}: the loss is {loss}. Stopped; no checkpoint was written yet.'
                       ' Lower train.learning_rate or use train.compute_dtype=float32.')
      log.write(json.dumps({'step': i + 1, 'loss': loss, 'draw_step': int(draws.step), 't': int(draws.t),
                            'concept': concepts[int(draws.concept)], 'seconds': time.perf_counter() - tick}) + '\n')
      bar.set_postfix(loss=f'{loss:.5f}')
      if (i + 1) % t.checkpoint_every == 0 or i + 1 == t.iterations:
        save(i + 1, state)
  finally:
    bar.close()
    log.close()
    manager.wait_until_finished()
    manager.close()
  return Erased(trained=dict(state.trained), metadata={**metadata, 'iterations': t.iterations}, workdir=workdir,
                pipe=pipe)
