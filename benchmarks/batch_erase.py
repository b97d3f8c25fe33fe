"""Batched erasure (N separate models in one vmapped step) against N sequential runs of the same work.

    python benchmarks/batch_erase.py [--model shapes-world] [--n 1 4 8 16] [--methods esd-x esd-u] [--iters 4]
    python benchmarks/batch_erase.py --model sd-v1-4-random --dtype bfloat16 --n 1 2 4 8   # accelerator host

For each method and N, both sides do exactly the same work: models m = 0…N-1, iterations i = 0…iters-1, each
with the draws esd_jax/train.py gives it (seed m, fold_in(i); the `paper` convention, so the sampled x_t and
its number of DDIM steps differ per model and iteration). Sequential: one jitted single-model step
(esd.train_step, as a one-concept run compiles it) called N × iters times. Batched: esd.separate_train_step
(vmap over the model axis, one shared frozen base) called iters times. Both are warmed up first; the first
call's time (compilation) is reported apart. Then the same again with the models' sampler lengths aligned
(train.shared_timesteps). Reported: wall seconds per iteration of all N models, the speed-ups (sequential /
batched), the throughput gain of one UNet forward at batch 2N over batch 2 (what batching alone can buy on
this device), and the memory each added model costs (its trained tensors and Adam moments, from the arrays'
sizes; the frozen base is shared). `--model sd-v1-4-random` builds an SD 1.4-sized UNet with random weights and random
77-token text embeddings, at 512 px (64×64 latents).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from esd_jax import esd, methods  # noqa: E402
from esd_jax.generate import Conditioning  # noqa: E402
from esd_jax.models.state_dict import split_flat  # noqa: E402

CONCEPTS = ('circle', 'square', 'triangle', 'cross', 'red', 'green', 'blue', 'yellow')


def setup(model: str):
  """(unet, scheduler config, prompts of 16 concepts, latent shape)."""
  if model == 'sd-v1-4-random':
    from esd_jax.loading import unet_config
    from esd_jax.models import build
    from esd_jax.tiny import SCHEDULER
    unet = build(unet_config('sd-v1-4'), seed=0)
    rng = np.random.default_rng(0)
    cond = lambda n: Conditioning(jnp.asarray(rng.standard_normal((n, 77, 768)), jnp.float32))
    prompts = esd.Prompts(cond(1), cond(16), None, jnp.zeros((16,), bool), jnp.ones((16,), jnp.float32))
    return unet, SCHEDULER, prompts, (64, 64, 4)
  from esd_jax.concepts import Concept
  from esd_jax.loading import load_pipeline, model_path
  from esd_jax.train import encode_concepts
  pipe = load_pipeline(model_path(model, '.'))
  concepts = [Concept(c) for c in (CONCEPTS * 2)[:16]]
  prompts = encode_concepts(pipe, concepts, 1.0, height=None, width=None)
  s = pipe.unet.config['sample_size']
  return pipe.unet, pipe.scheduler_config, prompts, (s, s, pipe.unet.config['in_channels'])


def rows_of(prompts: esd.Prompts, start: int, stop: int) -> esd.Prompts:
  """The prompts of concepts start…stop-1 (the shared empty prompt kept)."""
  return prompts._replace(concept=jax.tree.map(lambda a: a[start:stop], prompts.concept),
                          has_from=prompts.has_from[start:stop], eta=prompts.eta[start:stop])


def nbytes(tree) -> int:
  return sum(a.nbytes for a in jax.tree.leaves(tree))


def unet_ms_per_image(unet, prompts: esd.Prompts, latent_shape, batch: int, reps: int = 20) -> float:
  """Milliseconds per latent of one jitted UNet forward at this batch size: how much batching alone can gain."""
  context = jnp.broadcast_to(prompts.concept.context[:1], (batch, *prompts.concept.context.shape[1:]))
  forward = jax.jit(lambda x, c: unet(x, jnp.int32(500), c, None))
  x = jnp.ones((batch, *latent_shape))
  forward(x, context).block_until_ready()
  start = time.perf_counter()
  for _ in range(reps):
    forward(x, context).block_until_ready()
  return (time.perf_counter() - start) / reps / batch * 1e3


def timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def bench(model: str, method: str, ns: list[int], iters: int, dtype: str) -> list[dict]:
  unet, scheduler_config, prompts, latent_shape = setup(model)
  layout, frozen = split_flat(unet)
  keys = methods.trained_keys(frozen, method)
  objective = esd.Objective(compute_dtype=dtype)
  scheduler = objective.scheduler(scheduler_config)
  learning_rate = 1e-5
  tx = esd.optimizer(learning_rate)
  kwargs = dict(layout=layout, objective=objective, scheduler=scheduler)
  base = {k: frozen[k] for k in keys}
  draw = functools.partial(esd.draw, objective=objective, scheduler=scheduler, batch=1, latent_shape=latent_shape,
                           num_concepts=1)

  single = jax.jit(functools.partial(esd.train_step, tx=tx, **kwargs), donate_argnums=(0,))
  batched = jax.jit(functools.partial(esd.separate_train_step, **kwargs), donate_argnums=(0,))
  draw_many = jax.jit(lambda seeds, i: jax.vmap(lambda s: draw(jax.random.fold_in(jax.random.key(s), i)))(seeds))
  # The sampler runs 2 latents per model and step (classifier-free guidance).
  per_image_1 = unet_ms_per_image(unet, prompts, latent_shape, 2)
  warm = esd.init_state(jax.tree.map(jnp.copy, base), tx)
  _, compile_single = timed(single, warm, frozen, rows_of(prompts, 0, 1), jax.tree.map(lambda a: a[0], draw_many(
      jnp.arange(1), 0)))  # the first call compiles
  rows = []
  for n in ns:
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), base)
    init = jax.vmap(functools.partial(esd.init_state, tx=tx))
    per_model = nbytes(init(stacked)) // n
    model_prompts = esd.per_model(rows_of(prompts, 0, n))
    active, rates, seeds = jnp.ones((n,), bool), jnp.full((n,), learning_rate), jnp.arange(n)
    row = {'method': method, 'n': n, 'per_model_mb': per_model / 2**20, 'frozen_mb': nbytes(frozen) / 2**20,
           'compile_single_s': compile_single,
           'unet_gain': per_image_1 / unet_ms_per_image(unet, prompts, latent_shape, 2 * n)}
    # Each model's own draws (as train.py gives them), then with the sampler lengths aligned
    # (train.shared_timesteps: each model's own noise, model 0's t_enc and t); both sides the same draws.
    for mode, draws_of in (('own', draw_many), ('shared', lambda s, i: esd.share_timesteps(draw_many(s, i)))):
      draws = [draws_of(seeds, i) for i in range(iters + 1)]  # the last one for the warm-ups
      model_draws = lambda m, i: jax.tree.map(lambda a: a[m], draws[i])
      # Sequential: N one-model runs, one after another.
      states = [esd.init_state(jax.tree.map(jnp.copy, base), tx) for _ in range(n)]
      start = time.perf_counter()
      for m in range(n):
        for i in range(iters):
          states[m], metrics = single(states[m], frozen, rows_of(prompts, m, m + 1), model_draws(m, i))
        jax.block_until_ready(metrics)
      row[f'{mode}_sequential_s'] = (time.perf_counter() - start) / iters
      del states
      # Batched: the same N models and draws, one vmapped step per iteration.
      state = init(jax.tree.map(jnp.copy, stacked))  # a copy: the step donates the state
      (state, _), seconds = timed(batched, state, frozen, model_prompts, draws[iters], active, rates)
      row.setdefault('compile_batched_s', seconds)  # the first call for this N compiles
      start = time.perf_counter()
      for i in range(iters):
        state, metrics = batched(state, frozen, model_prompts, draws[i], active, rates)
      jax.block_until_ready(metrics)
      row[f'{mode}_batched_s'] = (time.perf_counter() - start) / iters
      del state
    rows.append(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='shapes-world')
  parser.add_argument('--n', type=int, nargs='+', default=[1, 4, 8, 16])
  parser.add_argument('--methods', nargs='+', default=['esd-x', 'esd-u'])
  parser.add_argument('--iters', type=int, default=4)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  print(f'{args.model}, paper convention, 50 DDIM steps, batch 1, {args.dtype}, {jax.devices()[0].platform} '
        f'({jax.device_count()} device), {args.iters} timed iterations per N')
  print('| method | N | own draws: sequential s/it (N runs) | batched s/it | speed-up | shared timesteps: '
        'sequential s/it | batched s/it | speed-up | UNet throughput, batch 2N vs 2 | compile s: one run / batched | '
        'MB per added model | frozen base MB |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for method in args.methods:
    for r in bench(args.model, method, args.n, args.iters, args.dtype):
      speedups = {m: r[f'{m}_sequential_s'] / r[f'{m}_batched_s'] for m in ('own', 'shared')}
      print(f'| {r["method"]} | {r["n"]} | {r["own_sequential_s"]:.3f} | {r["own_batched_s"]:.3f} | '
            f'{speedups["own"]:.2f}× | {r["shared_sequential_s"]:.3f} | {r["shared_batched_s"]:.3f} | '
            f'{speedups["shared"]:.2f}× | {r["unet_gain"]:.2f}× | {r["compile_single_s"]:.0f} / '
            f'{r["compile_batched_s"]:.0f} | {r["per_model_mb"]:.2f} | {r["frozen_mb"]:.1f} |', flush=True)

if __name__ == '__main__':
  main()
