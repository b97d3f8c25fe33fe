"""A small supervised training loop: Adam with warm-up and cosine decay, clipped gradients, optional EMA.

Shared by everything this project trains from scratch (the shapes-world VAE, text encoder and UNet, the
shapes classifier). The ESD fine-tuning itself lives in esd.py / train.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

Params = Any


def adam(steps: int, learning_rate: float, *, clip: float | None = 1.0) -> optax.GradientTransformation:
  """Adam on a 5 % linear warm-up then cosine decay to zero, after global-norm clipping (clip=None: none)."""
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))
  if clip is None:
    return optax.adam(schedule)
  return optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule))


def fit(params: Params, loss_fn: Callable[..., jax.Array], next_batch: Callable[[np.random.Generator], tuple],
        *, steps: int, seed: int, learning_rate: float, clip: float | None = 1.0, ema_decay: float | None = None,
        desc: str = 'train', log_every: int = 0) -> tuple[Params, list[dict[str, float]]]:
  """Minimises `loss_fn(params, key, *batch)` over `steps` fresh batches from `next_batch(rng)`.

  Gradients are clipped to global norm `clip` (None: not clipped). Returns the final parameters (their exponential moving average when `ema_decay` is set, with the usual
  warm-up min(decay, (1 + i) / (10 + i))) and a log of {step, loss, seconds} every `log_every` steps.
  Deterministic for a given seed on a given backend: batches come from numpy's default_rng(seed), the
  step's key is fold_in(key(seed), i).
  """
  tx = adam(steps, learning_rate, clip=clip)

  @jax.jit
  def step(params, opt_state, ema, i, key, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, key, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if ema is not None:
      decay = jnp.minimum(ema_decay, (1.0 + i) / (10.0 + i))
      ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    return params, opt_state, ema, loss

  opt_state = tx.init(params)
  ema = params if ema_decay else None
  rng, key = np.random.default_rng(seed), jax.random.key(seed)
  history, start = [], time.perf_counter()
  with tqdm(range(steps), desc=desc, unit='step', mininterval=2.0) as bar:
    for i in bar:
      params, opt_state, ema, loss = step(params, opt_state, ema, jnp.float32(i), jax.random.fold_in(key, i),
                                          *next_batch(rng))
      if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
        loss = float(loss)
        if not np.isfinite(loss):
          raise FloatingPointError(f'{desc}: loss is {loss} at step {i + 1}; lower the learning rate.')
        history.append({'step': i + 1, 'loss': loss, 'seconds': round(time.perf_counter() - start, 1)})
        bar.set_postfix(loss=f'{loss:.4f}')
  return (ema if ema_decay else params), history
