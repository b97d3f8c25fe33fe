"""The erase step on an accelerator: milliseconds per iteration, split into its parts, UNet images/s, achieved
TFLOP/s and MFU, for SD-1.4-sized random weights in bfloat16.

    python benchmarks/device.py                       # SD 1.4 at 512 px: the cases below, ≤ 8 min on one H200
    python benchmarks/device.py --small --json out.json --cases esd-x:1:1 esd-x:1:2     # CPU smoke test (CI)

A case is method:batch:models (models > 1: separate models, erase.separate_models, as `erase` trains them). Each
runs the exact jitted step `erase` runs (train.one_model / train.separate_models on train.make_setup: fp32
parameters and Adam, bf16 compute, attention as --attention, donated state) on random weights drawn on the device,
with the draw forced to t_enc = 49 (the paper convention's shortest path: one sampler step) and t_enc = 25 (25
steps) — one compiled step, as t_enc is traced. From the two:

  sampling, per step   (T25 − T49) / 24: one guided sampler step (a UNet forward on 2·batch·models latents)
  frozen forwards      the frozen UNet's forward on the same 2·batch·models latents (ε*(x_t, ""), ε*(x_t, c)), timed
                       alone
  student step         T49 − one sampling step − frozen forwards: the student's forward, backward and Adam
  iteration, mean draw T49 + (mean sampler steps − 1) × sampling per step (25.5 steps: t_enc uniform over 0…49)

UNet images/s = latents per second in the timed frozen forward. FLOPs are analytic: one UNet forward's FLOPs
(XLA's count of the forward, reference attention) × the forwards of the draw (sampler 2·B·N per step, frozen 2·B·N,
student ≈ 3·B·N for forward + backward), as XLA counts each loop body once. MFU = achieved FLOP/s / the chip's dense
bf16 peak (PEAK_TFLOPS; unknown chips and CPUs: none). Cases left when --budget-s is spent are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peak TFLOP/s per chip (vendor figures, no sparsity), matched against jax's device_kind.
PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'TPU v6': 918.0, 'TPU v5p': 459.0, 'TPU v5 lite': 197.0,
               'TPU v5e': 197.0, 'TPU v4': 275.0}
DEFAULT_CASES = ('esd-x:1:1', 'esd-u:1:1', 'esd-x:4:1', 'esd-u:4:1', 'esd-x:1:8', 'esd-x:4:8')
SHORT, LONG = 49, 25  # t_enc of the two timed draws: 1 and 25 sampler steps


def peak_tflops(device_kind: str) -> float | None:
  return next((peak for name, peak in PEAK_TFLOPS.items() if name.lower() in device_kind.lower()), None)


def random_unet(unet_config: dict, seed: int):
  """The UNet of `unet_config` with random weights drawn on the default device in one jitted call."""
  import jax
  from flax import nnx

  from esd_jax.models import build_abstract
  graphdef, state = nnx.split(build_abstract(unet_config))
  leaves, treedef = jax.tree.flatten(state)

  @jax.jit
  def fill(key):
    keys = jax.random.split(key, len(leaves))
    return [0.02 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, fill(jax.random.key(seed))))


def random_prompts(unet_config: dict, text_config: dict, plan, erase):
  import jax
  import jax.numpy as jnp

  from esd_jax.cost import abstract_prompts
  shapes = abstract_prompts(unet_config, text_config, plan, erase)
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  values = [jax.random.normal(k, a.shape, a.dtype) if a.dtype == jnp.float32 else jnp.zeros(a.shape, a.dtype)
            for k, a in zip(keys, leaves)]
  prompts = jax.tree.unflatten(treedef, values)
  return prompts._replace(eta=jnp.full(prompts.eta.shape, erase.negative_guidance, jnp.float32))


def config_for(args, method: str, batch: int, models: int):
  from configs import default
  config = default.get_config()
  config.model = args.model
  config.attention = args.attention
  config.erase.method = method
  config.erase.concepts = tuple(f'concept {i}' for i in range(models))
  config.erase.separate_models = models > 1
  config.train.batch_size = batch
  config.train.compute_dtype = args.dtype
  config.train.remat = args.remat
  config.mesh.data, config.mesh.fsdp = 1, 1
  return config


def timed(fn, reps: int) -> float:
  """Median ms of `reps` calls of `fn` (which blocks until its work is done), after one untimed call."""
  fn()
  times = []
  for _ in range(reps):
    tick = time.perf_counter()
    fn()
    times.append(time.perf_counter() - tick)
  return 1e3 * statistics.median(times)


def run_case(args, method: str, batch: int, models: int, unet, unet_config: dict, text_config: dict) -> dict:
  import jax
  import jax.numpy as jnp

  from esd_jax import cost, esd, train
  from esd_jax.generate import latent_size_of
  from esd_jax.loading import component_config
  from esd_jax.tiny import SCHEDULER

  start = time.perf_counter()
  config = config_for(args, method, batch, models)
  plan = train.plan_run(config)
  h, w = latent_size_of(unet_config, component_config(args.model, '.', 'vae'), None, None)
  prompts = random_prompts(unet_config, text_config, plan, config.erase)
  setup = train.make_setup(config, train.run_mesh(config, plan), unet, prompts, SCHEDULER,
                           (h, w, unet_config['in_channels']))
  layout = (train.separate_models if plan.separate else train.one_model)(setup, plan, config.train)
  state, active = layout.state, np.ones(len(plan.groups), bool)
  stride = setup.scheduler.num_train_timesteps // setup.objective.ddim_steps

  def forced(t_enc):
    draws = layout.draw(0)
    put = lambda value, like: jax.device_put(jnp.full(like.shape, value, like.dtype), like.sharding)
    return draws._replace(step=put(t_enc, draws.step), t=put(stride * t_enc + 7, draws.t))

  def step(draws):
    nonlocal state
    state, losses, _ = layout.step(state, draws, active, train.Settle())
    jax.block_until_ready(state)
    if not np.all(np.isfinite(losses)):
      raise RuntimeError(f'non-finite loss in case {method}:{batch}:{models}: {losses}')

  short, long = forced(SHORT), forced(LONG)
  t_short, t_long = timed(lambda: step(short), args.reps), timed(lambda: step(long), args.reps)

  # The frozen forward alone: the base UNet on the 2·B·N latents the step's teacher call sees.
  dtype = jnp.dtype(config.train.compute_dtype)
  latents = 2 * batch * models
  x = jnp.zeros((latents, h, w, unet_config['in_channels']), dtype)
  cond = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], (latents, *a.shape[1:])).astype(dtype), prompts.concept)
  forward = jax.jit(lambda p, x, c: setup.layout.module(p)(x, jnp.asarray(500), c.context, c.added_cond_kwargs()))
  t_forward = timed(lambda: jax.block_until_ready(forward(setup.frozen, x, cond)), args.reps)

  one_forward = cost.unet_forward_flops(setup)
  per_step = (t_long - t_short) / (SHORT - LONG)
  mean_steps = float(np.mean(esd.sampler_steps(setup.objective)))
  mean_ms = t_short + (mean_steps - 1) * per_step
  forwards = lambda steps: cost.unet_forwards(setup, models, batch, steps)
  peak = peak_tflops(jax.devices()[0].device_kind)
  achieved = lambda steps, ms: one_forward * forwards(steps) / (ms / 1e3) / 1e12
  row = {
      'case': f'{method}:{batch}:{models}', 'method': method, 'batch': batch, 'models': models,
      'ms': {'iteration_t_enc_49': t_short, 'iteration_t_enc_25': t_long, 'iteration_mean_draw': mean_ms,
             'sampling_per_step': per_step, 'frozen_forwards': t_forward,
             'student_step': t_short - per_step - t_forward},
      'unet_images_per_s': latents / (t_forward / 1e3),
      'tflop': {'unet_forward': one_forward / 1e12, 'iteration_t_enc_49': one_forward * forwards(1) / 1e12,
                'iteration_mean_draw': one_forward * forwards(mean_steps) / 1e12},
      'tflops_achieved': {'t_enc_49': achieved(1, t_short), 'mean_draw': achieved(mean_steps, mean_ms)},
      'seconds_with_compiles': time.perf_counter() - start,
  }
  row['mfu'] = {k: v / peak if peak else None for k, v in row['tflops_achieved'].items()}
  stats = jax.devices()[0].memory_stats() or {}
  row['peak_device_gib'] = stats.get('peak_bytes_in_use', 0) / 2 ** 30 or None
  return row


def table(rows: list[dict], header: str) -> str:
  lines = [header, '', '| case (method:batch:models) | iteration ms, t_enc 49 | iteration ms, mean draw | sampling '
           'ms / step | frozen forwards ms | student step ms | UNet images/s | TFLOP/s (mean draw) | MFU | peak GiB |',
           '|---|' + '---:|' * 9]
  for r in rows:
    if 'skipped' in r:
      lines.append(f"| {r['case']} | skipped: {r['skipped']} |" + ' |' * 8)
      continue
    ms, mfu, peak = r['ms'], r['mfu']['mean_draw'], r['peak_device_gib']
    lines.append(f"| {r['case']} | {ms['iteration_t_enc_49']:.1f} | {ms['iteration_mean_draw']:.1f} | "
                 f"{ms['sampling_per_step']:.1f} | {ms['frozen_forwards']:.1f} | {ms['student_step']:.1f} | "
                 f"{r['unet_images_per_s']:.1f} | {r['tflops_achieved']['mean_draw']:.1f} | "
                 f"{'' if mfu is None else f'{100 * mfu:.0f} %'} | "
                 f"{'' if peak is None else f'{peak:.1f}'} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='sd-v1-4', help='a reference name (configs only, random weights)')
  parser.add_argument('--small', action='store_true', help='the tiny-random configs instead (CPU smoke test)')
  parser.add_argument('--cases', nargs='+', default=list(DEFAULT_CASES), help='method:batch:models')
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  parser.add_argument('--remat', default='none')
  parser.add_argument('--attention', default='auto')
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--budget-s', type=float, default=450,
                      help='start no case after this many seconds (the first always runs)')
  parser.add_argument('--json', type=Path)
  args = parser.parse_args()
  if args.small:
    args.model = 'tiny-random'
  cases = []
  for case in args.cases:
    method, batch, models = case.split(':')
    cases.append((method, int(batch), int(models)))

  import jax

  from esd_jax.loading import component_config
  from esd_jax.models import attention
  began = time.perf_counter()
  unet_config = component_config(args.model, '.', 'unet')
  text_config = component_config(args.model, '.', 'text_encoder')
  unet = random_unet(unet_config, seed=0)
  attention.use(unet, args.attention)
  device = jax.devices()[0]
  header = (f'{args.model}, {args.dtype} compute (fp32 parameters and Adam), remat {args.remat}, attention '
            f'{args.attention}, paper convention, on {len(jax.devices())} × {device.device_kind} ({device.platform}); '
            f'peak {peak_tflops(device.device_kind) or "unknown"} TFLOP/s dense bf16 per chip')
  rows = []
  for method, batch, models in cases:
    if rows and time.perf_counter() - began > args.budget_s:
      rows.append({'case': f'{method}:{batch}:{models}', 'skipped': f'budget of {args.budget_s:.0f} s spent'})
      continue
    rows.append(run_case(args, method, batch, models, unet, unet_config, text_config))
    print(f"{rows[-1]['case']}: {rows[-1]['ms']['iteration_t_enc_49']:.1f} ms at t_enc 49 "
          f"({rows[-1]['seconds_with_compiles']:.0f} s with compiles)", flush=True)
  print(table(rows, header))
  print(f'\ntotal {time.perf_counter() - began:.0f} s')
  if args.json:
    args.json.write_text(json.dumps({'header': header, 'rows': rows}, indent=2))


if __name__ == '__main__':
  main()
