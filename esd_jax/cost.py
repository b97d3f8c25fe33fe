"""What one erasure iteration costs per chip, without weights: XLA compiles the exact jitted step that `erase` runs
(train.one_model / train.separate_models) from abstract parameters on the config's mesh, and its memory and cost
analyses account for it.

On CPU the emulated devices stand for the chips (`plan.devices`). XLA:CPU's buffer assignment estimates what the
TPU and GPU compilers would allocate, not more: their fusion, layouts and scheduling differ. FLOPs are XLA's count
of the compiled program, in which a loop body counts once (the sampler's whatever the draw, and chunked attention's
one block of queries); the analytic count next to it multiplies one UNet forward (with the reference attention, no
loop) by the forwards an iteration makes for a given sampler length.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esd_jax import esd, train
from esd_jax.attack import adversary_encoder
from esd_jax.generate import Conditioning, latent_size_of
from esd_jax.loading import component_config
from esd_jax.models import attention, build_abstract

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_HLO_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f16': 2, 'bf16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
              'f64': 8, 's64': 8, 'u64': 8}
_SDXL_TIME_IDS = 6  # original size, crop offset, target size


def abstract_prompts(unet_config: dict, text_config: dict, plan: train.Plan,
                     erase: ml_collections.ConfigDict) -> esd.Prompts:
  """The shapes of the run's text conditioning, from the configs alone (float32, as encode_prompts returns it), and
  with erase.adversarial robust erasure's search (its text encoder built abstractly)."""
  length = text_config.get('max_position_embeddings', 77)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

  def conditioning(n):
    if unet_config.get('addition_embed_type') != 'text_time':
      return Conditioning(f32(n, length, unet_config['cross_attention_dim']))
    pooled = unet_config['projection_class_embeddings_input_dim'] - _SDXL_TIME_IDS * unet_config[
        'addition_time_embed_dim']
    return Conditioning(f32(n, length, unet_config['cross_attention_dim']), f32(n, pooled), f32(n, _SDXL_TIME_IDS))
  n, retain = len(plan.concepts), len(plan.retain)
  has_from = any(c.erase_from for c in plan.concepts)
  adversary = None
  if erase.get('adversarial'):
    layout, encoder = adversary_encoder(build_abstract(text_config), plan,
                                        sdxl=unet_config.get('addition_embed_type') == 'text_time')
    vocabulary, dim = encoder[esd.TOKEN_EMBEDDING].shape
    adversary = esd.Adversary(encoder, f32(n, length, dim), f32(n, length, 1),
                              jax.ShapeDtypeStruct((vocabulary,), jnp.int32), layout, erase.adversarial_steps,
                              erase.adversarial_learning_rate, erase.get('adversarial_tokens', 0))
  return esd.Prompts(conditioning(1), conditioning(n), conditioning(n) if has_from else None,
                     jax.ShapeDtypeStruct((n,), jnp.bool_), f32(n), conditioning(retain) if retain else None,
                     adversary)


def abstract_setup(config: ml_collections.ConfigDict, plan: train.Plan) -> train.Setup:
  """train.set_up with shapes only: the model's UNet built abstractly from its config, no weights read."""
  def component(name):
    return component_config(config.model, config.workdir, name, prediction_type=config.prediction_type or None)
  unet_config = component('unet')
  size = config.erase.resolution or None
  h, w = latent_size_of(unet_config, component('vae'), size, size)
  from esd_jax.tiny import SCHEDULER  # SD's noise schedule: the step's shapes do not depend on its values
  unet = build_abstract(unet_config)
  attention.use(unet, config.attention)
  return train.make_setup(config, train.run_mesh(config, plan), unet,
                          abstract_prompts(unet_config, component('text_encoder'), plan, config.erase),
                          SCHEDULER, (h, w, unet_config['in_channels']), abstract=True)


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes each kind of collective produces per device in a compiled HLO module (each instruction once: a
  collective inside a loop body counts once)."""
  totals = dict.fromkeys(COLLECTIVES, 0)
  pattern = re.compile(r'=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if match:
      totals[match.group(2)] += sum(
          _HLO_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
          for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', match.group(1)))
  return totals


def _shard_bytes(tree) -> int:
  """Bytes per device of abstract arrays with shardings (the largest shard, as every device holds one)."""
  return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def unet_forward_flops(setup: train.Setup) -> float:
  """XLA's FLOPs of one UNet forward on one latent (the run's compute dtype), from the lowered program, with the
  reference attention: XLA counts a loop body once, and chunked attention loops over query blocks."""
  dtype = jnp.dtype(setup.objective.compute_dtype)
  params = {k: jax.ShapeDtypeStruct(v.shape, dtype) for k, v in setup.frozen.items()}
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), dtype), setup.prompts.uncond)
  x = jax.ShapeDtypeStruct((1, *setup.latent_shape), dtype)
  def forward(p, x, c):
    unet = setup.layout.module(p)
    attention.use(unet, 'xla')
    return unet(x, jnp.asarray(500), c.context, c.added_cond_kwargs())
  return float(_flops(jax.jit(forward).lower(params, x, one).cost_analysis()))


def _flops(analysis) -> float:
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get('flops', 0.0))


def unet_forwards(setup: train.Setup, n_models: int, batch: int, steps: float) -> float:
  """Single-latent UNet forwards of one iteration for a sampler of `steps` steps: the guided sampler runs each step
  on 2 × batch latents, the frozen model its 2 (3 with erase_from) conditionings, and the student's forward and
  backward count as about three forwards; for every model. With retain prompts each latent has a retain twin that
  the sampler, the frozen model (once) and the student see too. Robust erasure's inner search adds, per search step
  and latent, the student's forward and its backward to the prompt (three forwards, as above), and with prefix
  tokens the student's forward and backward at the prefixed prompt (three more); the text encoder's share (one
  prompt per step, not per latent) is not counted."""
  retain, adversary = setup.prompts.retain is not None, setup.prompts.adversary
  latents = 1 + retain
  frozen = 2 + (setup.prompts.student is not None) + retain
  search = 0 if adversary is None else 3 * adversary.steps + 3 * bool(adversary.tokens)
  return n_models * batch * (2 * steps * latents + frozen + 3 * latents + search)


def step_cost(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Compiles the erase step of `config` abstractly; its memory per device, FLOPs and collectives."""
  plan = train.plan_run(config)
  setup = abstract_setup(config, plan)
  models = (train.separate_models if plan.separate else train.one_model)(setup, plan, config.train)
  compiled = models.lower().compile()
  memory = compiled.memory_analysis()
  arguments, outputs = memory.argument_size_in_bytes, memory.output_size_in_bytes
  aliased, temporaries = memory.alias_size_in_bytes, memory.temp_size_in_bytes
  n_models, batch = len(plan.groups), config.train.batch_size * config.train.concepts_per_step
  forward = unet_forward_flops(setup)
  per_iteration = lambda steps: forward * unet_forwards(setup, n_models, batch, steps)
  steps = esd.sampler_steps(setup.objective)
  return {
      'model': str(config.model), 'method': config.erase.method, 'convention': config.erase.convention,
      'compute_dtype': config.train.compute_dtype, 'remat': config.train.remat,
      'attention': attention.resolved(config.attention),
      'frozen_dtype': train.frozen_dtype(config.train), 'separate_models': n_models if plan.separate else 0,
      'adversarial_steps': 0 if setup.prompts.adversary is None else setup.prompts.adversary.steps,
      'mesh': dict(setup.mesh.shape), 'devices': setup.mesh.size, 'platform': jax.devices()[0].platform,
      'latent_shape': list(setup.latent_shape), 'batch': batch,
      'trained_tensors': len(setup.keys),
      'trained_parameters': int(sum(np.prod(setup.frozen[k].shape) for k in setup.keys)),
      'per_device_bytes': {
          'frozen_base': _shard_bytes(setup.frozen), 'trained': _shard_bytes(models.state.trained),
          'adam': _shard_bytes(models.state.opt_state), 'arguments': arguments, 'outputs': outputs,
          'aliased': aliased, 'temporaries': temporaries,
          'total': arguments + outputs - aliased + temporaries},
      'flops': {
          'xla_per_iteration': _flops(compiled.cost_analysis()), 'unet_forward': forward,
          'shortest_draw': per_iteration(min(steps)), 'mean_draw': per_iteration(float(np.mean(steps))),
          'longest_draw': per_iteration(max(steps)), 'sampler_steps': [min(steps), float(np.mean(steps)), max(steps)]},
      'collective_bytes_per_device': collective_bytes(compiled.as_text()),
  }
