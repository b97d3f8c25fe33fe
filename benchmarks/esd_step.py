"""Milliseconds and peak host memory of one ESD iteration on this CPU: esd-jax against the PyTorch reference.

    python benchmarks/esd_step.py [--configs small mid] [--reps 3] [--t-enc 25]

Random weights, fp32, method esd-x, the `paper` convention, 50 DDIM steps, batch 1, η = 1, guidance 3.
Per UNet config, each implementation runs in its own subprocess (so that peak RSS do not mix) and times,
after a warm-up call (JAX: the compilation), the median and min over --reps repetitions of:

  - sampling x_t: the guided partial DDIM loop with the model being trained, for one step (t_enc = 49) and for
    t_enc (50 − t_enc steps; 25 for t_enc = 25);
  - the frozen forwards: ε*(x_t, "") and ε*(x_t, c) and the target built from them;
  - the student update: ε_θ(x_t, c) forward, backward to the trained tensors, one Adam step;
  - the whole iteration: esd.train_step jitted as esd_jax/train.py jits it (state donated, one device), and
    tests/torch_esd.esd_step with the frozen copy passed in (as a training loop holds it, no copy per step).

JAX pieces are jitted one by one, with the arrays as arguments and the t_enc of sample_x_t traced (as in the
real step), and timed with jax.block_until_ready. The PyTorch pieces are the reference's own functions or the
same lines as its esd_step, under torch.no_grad() where the reference uses it, with torch.set_num_threads(2)
(--torch-threads) and OMP_WAIT_POLICY=PASSIVE unless the environment sets it.
Both sides build their own random weights of the same config: cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CA, _D, _CU, _U = 'CrossAttnDownBlock2D', 'DownBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'
# diffusers' attention_head_dim is the number of heads in SD 1.x configs (8 there and here).
CONFIGS = {
    'small': {'unet': 'tiny', 'context_len': 16},  # esd_jax.tiny.UNET, 16×16 latents
    'mid': {'unet': {
        '_class_name': 'UNet2DConditionModel', 'sample_size': 32, 'in_channels': 4, 'out_channels': 4,
        'block_out_channels': [32, 64, 128], 'layers_per_block': 1, 'norm_num_groups': 32,
        'cross_attention_dim': 256, 'attention_head_dim': 8, 'down_block_types': [_CA, _CA, _D],
        'up_block_types': [_U, _CU, _CU]}, 'context_len': 77},
}
DDIM_STEPS, GUIDANCE, ETA, LR, METHOD = 50, 3.0, 1.0, 1e-5, 'esd-x'
# OpenMP threads that spin while waiting for each other make torch up to 100× slower when other processes hold
# the cores (measured here: 1.7 s instead of 17 ms per small-UNet forward); passive waiting avoids that.
OMP_WAIT_POLICY = os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')


def unet_config(name: str) -> dict:
  unet = CONFIGS[name]['unet']
  if unet == 'tiny':
    from esd_jax.tiny import UNET
    return dict(UNET)
  return dict(unet)


def sampling_steps(t_enc: int) -> int:
  """Guided steps the `paper` sampler runs for t_enc (docs/method.md §2): 49 for t_enc ∈ {0, 1}, else 50 − t_enc."""
  return min(DDIM_STEPS - 1, DDIM_STEPS - t_enc)


def query_t(t_enc: int) -> int:
  """A query timestep the `paper` convention allows at t_enc: one of 20·t_enc + {0..19}."""
  return (1000 // DDIM_STEPS) * t_enc + 7


def inputs(config: dict, context_len: int):
  """x_T (NHWC) and the "" and concept embeddings (1, L, D), the same numbers on both sides."""
  import numpy as np
  rng = np.random.default_rng(0)
  size, dim = config['sample_size'], config['cross_attention_dim']
  x_T = rng.standard_normal((1, size, size, config['in_channels'])).astype(np.float32)
  uncond, concept = (rng.standard_normal((1, context_len, dim)).astype(np.float32) for _ in range(2))
  return x_T, uncond, concept


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def current_rss_mb() -> float:
  """Resident memory now (what the process holds, without transient peaks such as compilation)."""
  status = Path('/proc/self/status').read_text()
  return int(re.search(r'VmRSS:\s+(\d+) kB', status).group(1)) / 1024


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def timed(fn, reps: int, sync=lambda out: out, warmup=None) -> tuple[dict, object]:
  """(stats, last output): seconds of the warm-up call `warmup()` (default `fn()`; for JAX it compiles, and a
  cheaper call with other traced values serves as well), then median and min of `reps` calls of `fn` in ms.
  `warmup=False`: already warm."""
  tick = time.perf_counter()
  if warmup is not False:
    sync((warmup or fn)())
  first = time.perf_counter() - tick
  times = []
  for _ in range(reps):
    tick = time.perf_counter()
    out = sync(fn())
    times.append(time.perf_counter() - tick)
  return {'first_s': first, 'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times)}, out


def run_jax(name: str, reps: int, t_enc: int, attention_implementation: str) -> dict:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  from esd_jax import esd
  from esd_jax.generate import Conditioning
  from esd_jax.methods import trained_keys
  from esd_jax.models import attention, build
  from esd_jax.models.state_dict import split_flat
  from esd_jax.tiny import SCHEDULER

  after_imports = peak_rss_mb()
  config = unet_config(name)
  x_T, uncond_np, concept_np = inputs(config, CONFIGS[name]['context_len'])
  unet = build(config, seed=0)
  attention.use(unet, attention_implementation)
  layout, frozen = split_flat(unet)
  keys = trained_keys(frozen, METHOD)
  objective = esd.Objective(convention='paper', negative_guidance=ETA, guidance=GUIDANCE,
                            ddim_steps=DDIM_STEPS)
  scheduler = objective.scheduler(SCHEDULER)
  dtype = jnp.dtype(objective.compute_dtype)
  tx = esd.optimizer(LR)
  uncond, concept = Conditioning(jnp.asarray(uncond_np)), Conditioning(jnp.asarray(concept_np))
  x_T, t = jnp.asarray(x_T), jnp.int32(query_t(t_enc))
  trained = {k: jnp.copy(frozen[k]) for k in keys}
  sync = jax.block_until_ready

  @jax.jit
  def sample(trained, frozen, x_T, step, uncond, concept):
    model = layout.module({**frozen, **trained})
    return esd.sample_x_t(objective, scheduler, model, x_T, step, uncond, concept)

  @jax.jit
  def teacher_target(frozen, x_t, t, uncond, concept):
    both = esd._cat(uncond, concept)
    e_uncond, e_concept = jnp.split(
        esd._predict(layout.module(frozen), jnp.concatenate([x_t, x_t]), t, both, dtype), 2)
    return e_uncond - ETA * (e_concept - e_uncond)

  @jax.jit
  def student_update(trained, opt_state, frozen, x_t, t, concept, target):
    def loss(trained):
      e = esd._predict(layout.module({**frozen, **trained}), x_t, t, concept, dtype)
      return jnp.mean(jnp.square(e - target))
    value, grads = jax.value_and_grad(loss)(trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, value

  results = {}
  results['sample_1'], _ = timed(
      lambda: sample(trained, frozen, x_T, jnp.int32(DDIM_STEPS - 1), uncond, concept), reps, sync)
  results['sample_t_enc'], x_t = timed(
      lambda: sample(trained, frozen, x_T, jnp.int32(t_enc), uncond, concept), reps, sync, warmup=False)
  results['teacher'], target = timed(lambda: teacher_target(frozen, x_t, t, uncond, concept), reps, sync)
  opt_state = tx.init(trained)
  results['student'], _ = timed(
      lambda: student_update(trained, opt_state, frozen, x_t, t, concept, target), reps, sync)

  step_fn = jax.jit(functools.partial(esd.train_step, layout=layout, objective=objective, scheduler=scheduler,
                                      tx=tx), donate_argnums=(0,))
  prompts = esd.Prompts(uncond, concept, None, jnp.asarray([False]))
  state = esd.init_state({k: jnp.copy(v) for k, v in trained.items()}, tx)
  losses = []

  def whole(step):
    nonlocal state
    state, metrics = step_fn(state, frozen, prompts, esd.Draws(x_T, jnp.int32(step), jnp.int32(query_t(step)),
                                                               jnp.int32(0)))
    losses.append(metrics['loss'])
    return state

  # The warm-up (compilation) draws t_enc = 48, a 2-step sample: the timed t_enc must reuse that compiled
  # step, as t_enc and the timestep are traced (checked by `compiled` below).
  results['whole'], _ = timed(lambda: whole(t_enc), reps, sync, warmup=lambda: whole(48))
  compiled = {'train_step': step_fn._cache_size(), 'sample_x_t': sample._cache_size()}
  return {'times': results, 'compiled': compiled, 'loss': float(losses[1]),
          'params': sum(v.size for v in frozen.values()), 'trained': sum(trained[k].size for k in keys),
          'rss_after_imports_mb': after_imports}


def run_torch(name: str, reps: int, t_enc: int, threads: int) -> dict:
  import copy

  import numpy as np
  import torch
  import torch.nn.functional as F
  from diffusers import DDIMScheduler, UNet2DConditionModel

  from esd_jax.tiny import SCHEDULER
  from tests import torch_esd

  torch.set_num_threads(threads)
  after_imports = peak_rss_mb()
  config = unet_config(name)
  x_T, uncond_np, concept_np = inputs(config, CONFIGS[name]['context_len'])
  torch.manual_seed(0)
  unet = UNet2DConditionModel.from_config(config).eval()
  teacher = copy.deepcopy(unet)  # θ*: the reference holds the frozen model as a second full UNet
  keys = [k for k, _ in unet.named_parameters() if torch_esd.TRAIN_METHODS[METHOD](k)]
  params = dict(unet.named_parameters())
  sched_config = DDIMScheduler.from_config(SCHEDULER).config
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(x_T, (0, 3, 1, 2))))
  uncond, concept = torch.from_numpy(uncond_np), torch.from_numpy(concept_np)
  t = query_t(t_enc)

  def sample(step):
    with torch.no_grad():
      return torch_esd.sample_paper(unet, sched_config, DDIM_STEPS, x, concept, uncond, GUIDANCE, step)

  def teacher_target(x_t):
    with torch.no_grad():
      e_concept, e_uncond = torch_esd._eps(teacher, x_t, t, concept), torch_esd._eps(teacher, x_t, t, uncond)
      return e_uncond - ETA * (e_concept - e_uncond)

  results = {}
  results['sample_1'], _ = timed(lambda: sample(DDIM_STEPS - 1), reps)
  results['sample_t_enc'], x_t = timed(lambda: sample(t_enc), reps, warmup=False)
  results['teacher'], target = timed(lambda: teacher_target(x_t), reps)

  for k, p in params.items():
    p.requires_grad_(k in keys)
  optimizer = torch.optim.Adam([params[k] for k in keys], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)

  def student_update():
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(torch_esd._eps(unet, x_t, t, concept), target)
    loss.backward()
    optimizer.step()
    return loss

  results['student'], _ = timed(student_update, reps)
  losses = []

  def whole(step):
    out = torch_esd.esd_step(unet, SCHEDULER, convention='paper', x_T=x, step_index=step,
                             query_t=query_t(step), concept_emb=concept, uncond_emb=uncond, eta=ETA,
                             guidance=GUIDANCE, num_ddim_steps=DDIM_STEPS, trained=keys, lr=LR,
                             teacher=teacher)
    losses.append(out['loss'])

  results['whole'], _ = timed(lambda: whole(t_enc), reps, warmup=lambda: whole(48))
  return {'times': results, 'loss': losses[1], 'params': sum(p.numel() for p in params.values()),
          'trained': sum(params[k].numel() for k in keys), 'rss_after_imports_mb': after_imports}


def busy_cpu_seconds() -> float:
  """CPU seconds all processes of this machine have spent (user + system), from /proc/stat."""
  fields = Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]
  user, nice, system = (int(v) for v in fields[:3])
  return (user + nice + system) / os.sysconf('SC_CLK_TCK')


def worker(args: argparse.Namespace) -> None:
  name = args.configs[0]
  if args.worker == 'jax':
    result = run_jax(name, args.reps, args.t_enc, args.attention[0])
  else:
    result = run_torch(name, args.reps, args.t_enc, args.torch_threads)
  result.update(peak_rss_mb=peak_rss_mb(), rss_end_mb=current_rss_mb(), cpu_s=cpu_seconds())
  print('RESULT ' + json.dumps(result))


def launch(impl: str, name: str, args: argparse.Namespace, attention: str = 'xla') -> dict:
  """Runs one implementation's worker in a fresh process; adds the CPU time other work took meanwhile."""
  env = dict(os.environ, OMP_WAIT_POLICY=OMP_WAIT_POLICY)
  command = [sys.executable, __file__, '--worker', impl, '--configs', name, '--reps', str(args.reps),
             '--t-enc', str(args.t_enc), '--torch-threads', str(args.torch_threads), '--attention', attention]
  busy, tick = busy_cpu_seconds(), time.perf_counter()
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'The {impl} worker for config {name!r} failed (exit {proc.returncode}):\n'
                       f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  result = json.loads(lines[-1][len('RESULT '):])
  wall = time.perf_counter() - tick
  result['wall_s'] = wall
  result['other_cores'] = max(0.0, busy_cpu_seconds() - busy - result['cpu_s']) / wall
  return result


def table(name: str, t_enc: int, ours: dict[str, dict], ref: dict) -> str:
  """The markdown table of one config: times in ms, median (min), for each of our attention implementations and
  the reference; torch / ours on the medians, for each of ours."""
  config = unet_config(name)
  steps = sampling_steps(t_enc)
  first_of_ours = next(iter(ours.values()))
  median = lambda r, key: r['times'][key]['median_ms']
  timing = lambda r, key: f"{median(r, key):.1f} ({r['times'][key]['min_ms']:.1f})"
  heads = [f'ours, {a} attention' for a in ours] + ['PyTorch reference'] + [f'torch / ours ({a})' for a in ours]
  lines = [
      f"### {name}: {len(config['block_out_channels'])} levels {tuple(config['block_out_channels'])}, "
      f"{config['sample_size']}×{config['sample_size']} latents, context {CONFIGS[name]['context_len']}×"
      f"{config['cross_attention_dim']}, {first_of_ours['params'] / 1e6:.2f} M parameters, {METHOD} trains "
      f"{first_of_ours['trained'] / 1e6:.3f} M",
      '', '| ms per call, median (min) | ' + ' | '.join(heads) + ' |', '|---' * (len(heads) + 1) + '|']

  def row(label, value, ratio=None):
    """`value(r)` for each of ours and the reference; `ratio(ours, ref)` for each of ours."""
    cells = [value(r) for r in (*ours.values(), ref)]
    cells += [f'{ratio(r, ref):.2f}' if ratio else '' for r in ours.values()]
    lines.append(f"| {label} | {' | '.join(cells)} |")

  pieces = {'sample_1': 'sampling x_t, one guided step (t_enc = 49)',
            'sample_t_enc': f'sampling x_t, t_enc = {t_enc} ({steps} steps)',
            'teacher': 'frozen forwards ε*(x_t, ""), ε*(x_t, c) + target (ours one batch-2 call, torch two)',
            'student': 'student forward + backward + Adam'}
  for key, label in pieces.items():
    row(label, lambda r: timing(r, key), lambda a, b: median(b, key) / median(a, key))
  per_step = lambda r: median(r, 'sample_t_enc') / steps
  row(f'sampling x_t, per step of the {steps}-step loop (derived)', lambda r: f'{per_step(r):.1f}',
      lambda a, b: per_step(b) / per_step(a))
  total = lambda r: sum(median(r, key) for key in ('sample_t_enc', 'teacher', 'student'))
  row(f'sum of the three pieces at t_enc = {t_enc}', lambda r: f'{total(r):.1f}', lambda a, b: total(b) / total(a))
  row('**whole iteration** (esd.train_step / torch_esd.esd_step)', lambda r: timing(r, 'whole'),
      lambda a, b: median(b, 'whole') / median(a, 'whole'))
  row('warm-up whole iteration at t_enc = 48, s (JAX: compilation + 2-step run)',
      lambda r: f"{r['times']['whole']['first_s']:.1f}")
  row('peak RSS, MB', lambda r: f"{r['peak_rss_mb']:.0f}", lambda a, b: b['peak_rss_mb'] / a['peak_rss_mb'])
  row('RSS at the end (held, without transient peaks), MB', lambda r: f"{r['rss_end_mb']:.0f}")
  row('RSS after imports, MB', lambda r: f"{r['rss_after_imports_mb']:.0f}")
  row(f'loss at t_enc = {t_enc} (each side its own random weights)', lambda r: f"{r['loss']:.4g}")
  compiled = ', '.join(f"{a}: train_step {r['compiled']['train_step']}, sample_x_t {r['compiled']['sample_x_t']}"
                       for a, r in ours.items())
  others = ', '.join(f"{r['other_cores']:.2f} ({a})" for a, r in ours.items())
  walls = ', '.join(f"{r['wall_s']:.0f} s ({a})" for a, r in ours.items())
  lines += ['', f"Compiled versions after two different draws (1: no recompilation): {compiled}. Other work on "
            f"this machine meanwhile, cores of {os.cpu_count()}: {others}, {ref['other_cores']:.2f} (torch); "
            f"worker wall time {walls}, {ref['wall_s']:.0f} s (torch)."]
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument('--reps', type=int, default=3, help='timed repetitions per piece (after one warm-up)')
  parser.add_argument('--t-enc', type=int, default=25,
                      help='paper t_enc ∈ {0..49}: 50 − t_enc sampling steps (49 for 0 and 1)')
  parser.add_argument('--torch-threads', type=int, default=2, help='torch.set_num_threads for the reference')
  parser.add_argument('--attention', nargs='+', default=['xla', 'auto'],
                      help='our attention implementations, a column each (esd_jax/models/attention.py)')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not 0 <= args.t_enc < DDIM_STEPS:
    parser.error(f'--t-enc {args.t_enc}: the paper convention draws t_enc from 0..{DDIM_STEPS - 1}.')
  if args.reps < 1 or args.torch_threads < 1:
    parser.error('--reps and --torch-threads must be at least 1.')
  if args.worker:
    worker(args)
    return
  print(f'ESD iteration on {os.cpu_count()} CPU cores: {METHOD}, paper convention, fp32, {DDIM_STEPS} DDIM '
        f'steps, batch 1; torch.set_num_threads({args.torch_threads}) with OMP_WAIT_POLICY='
        f'{OMP_WAIT_POLICY}, XLA:CPU with its default thread pool.\n', flush=True)
  for name in args.configs:
    ours = {a: launch('jax', name, args, a) for a in args.attention}
    print(table(name, args.t_enc, ours, launch('torch', name, args)) + '\n', flush=True)


if __name__ == '__main__':
  sys.path.insert(0, str(ROOT))
  main()
