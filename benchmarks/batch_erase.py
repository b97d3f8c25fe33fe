"""Batched erasure (N separate models in one vmapped step) against N sequential runs of the same work.

    python benchmarks/batch_erase.py [--model shapes-world] [--n 1 4 8 16] [--methods esd-x esd-u] [--iters 4]
    python benchmarks/batch_erase.py --model sd-v1-4-random --dtype bfloat16 --n 1 2 4 8   # accelerator host

For each method and N, both sides do exactly the same work: models m = 0…N-1, iterations i = 0…iters-1, each
with the draws esd_jax/train.py gives it (seed m, fold_in(i); the `paper` convention, so the sampled x_t and
its number of DDIM steps differ per model and iteration). Sequential: one jitted single-model step
(esd.train_step, as a one-concept run compiles it) called N × iters times. Batched: esd.separate_train_step
(vmap over the model axis, one shared frozen base) called iters times. Both are warmed up first (compilation
not timed). Reported: wall seconds per iteration of all N models, the speed-up (sequential / batched), and
the memory each added model costs (its trained tensors and Adam moments, from the arrays' sizes; the frozen
base is shared). `--model sd-v1-4-random` builds an SD 1.4-sized UNet with random weights and random
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
    from esd_jax.commands import REFERENCE_CONFIGS
    from esd_jax.models import build
    from convert.diffusers_format import read_json
    from esd_jax.tiny import SCHEDULER
    unet = build(read_json(REFERENCE_CONFIGS / 'sd-v1-4' / 'unet' / 'config.json'), seed=0)
    rng = np.random.default_rng(0)
    cond = lambda n: Conditioning(jnp.asarray(rng.standard_normal((n, 77, 768)), jnp.float32))
    prompts = esd.Prompts(cond(1), cond(16), None, jnp.zeros((16,), bool), jnp.ones((16,), jnp.float32))
    return unet, SCHEDULER, prompts, (64, 64, 4)
  from convert import load_pipeline
  from esd_jax.concepts import Concept
  from esd_jax.evaluate import SHAPES_WORLD
  from esd_jax.train import encode_concepts
  pipe = load_pipeline(SHAPES_WORLD if model == 'shapes-world' else model)
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


def bench(model: str, method: str, ns: list[int], iters: int, dtype: str) -> list[dict]:
  unet, scheduler_config, prompts, latent_shape = setup(model)
  layout, frozen = split_flat(unet)
  keys = methods.trained_keys(frozen, method)
  objective = esd.Objective(compute_dtype=dtype)
  scheduler = objective.scheduler(scheduler_config)
  tx = esd.optimizer(1e-5)
  kwargs = dict(layout=layout, objective=objective, scheduler=scheduler, tx=tx)
  base = {k: frozen[k] for k in keys}
  draw = functools.partial(esd.draw, objective=objective, scheduler=scheduler, batch=1, latent_shape=latent_shape,
                           num_concepts=1)

  single = jax.jit(functools.partial(esd.train_step, **kwargs), donate_argnums=(0,))
  batched = jax.jit(functools.partial(esd.separate_train_step, **kwargs), donate_argnums=(0,))
  draw_one = jax.jit(lambda seed, i: draw(jax.random.fold_in(jax.random.key(seed), i)))
  draw_many = jax.jit(lambda seeds, i: jax.vmap(lambda s: draw(jax.random.fold_in(jax.random.key(s), i)))(seeds))
  rows = []
  for n in ns:
    # Sequential: N one-model runs, one after another.
    states = [esd.init_state(jax.tree.map(jnp.copy, base), tx) for _ in range(n)]
    states[0], _ = single(states[0], frozen, rows_of(prompts, 0, 1), draw_one(0, iters))  # warm-up (compiles)
    jax.block_until_ready(states[0])
    start = time.perf_counter()
    for m in range(n):
      for i in range(iters):
        states[m], metrics = single(states[m], frozen, rows_of(prompts, m, m + 1), draw_one(m, i))
      jax.block_until_ready(metrics)
    sequential = (time.perf_counter() - start) / iters
    del states

    # Batched: the same N models and draws, one vmapped step per iteration.
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), base)
    state = jax.vmap(functools.partial(esd.init_state, tx=tx))(stacked)
    per_model = nbytes(state) // n
    model_prompts = esd.per_model(rows_of(prompts, 0, n))
    active, seeds = jnp.ones((n,), bool), jnp.arange(n)
    state, _ = batched(state, frozen, model_prompts, draw_many(seeds, iters), active)  # warm-up
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(iters):
      state, metrics = batched(state, frozen, model_prompts, draw_many(seeds, i), active)
    jax.block_until_ready(metrics)
    together = (time.perf_counter() - start) / iters
    rows.append({'method': method, 'n': n, 'sequential_s': sequential, 'batched_s': together,
                 'speedup': sequential / together, 'per_model_mb': per_model / 2**20,
                 'frozen_mb': nbytes(frozen) / 2**20, 'trained_tensors': len(keys)})
    del state
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
  print('| method | N | sequential s/it (N runs) | batched s/it | speed-up | MB per added model | frozen base MB |')
  print('|---|---|---|---|---|---|---|')
  for method in args.methods:
    for r in bench(args.model, method, args.n, args.iters, args.dtype):
      print(f'| {r["method"]} | {r["n"]} | {r["sequential_s"]:.3f} | {r["batched_s"]:.3f} | '
            f'{r["speedup"]:.2f}× | {r["per_model_mb"]:.2f} | {r["frozen_mb"]:.1f} |', flush=True)


if __name__ == '__main__':
  main()
