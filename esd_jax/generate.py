"""Text-to-image: classifier-free guided sampling and VAE decoding, the whole loop under one `jit`.

Follows diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline step for step, so that from the same
initial latents our images match theirs. Latents and images are NHWC; images are floats in [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esd_jax.models.state_dict import split_flat
from esd_jax.pipeline import StableDiffusion
from esd_jax.schedulers import make_scheduler
from esd_jax.tokenizer import tokenize


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """What the UNet is conditioned on: text context, plus SDXL's pooled text embeds and time ids."""

  context: jax.Array
  text_embeds: jax.Array | None = None
  time_ids: jax.Array | None = None

  def added_cond_kwargs(self):
    return None if self.text_embeds is None else {'text_embeds': self.text_embeds, 'time_ids': self.time_ids}


jax.tree_util.register_dataclass(Conditioning, data_fields=['context', 'text_embeds', 'time_ids'], meta_fields=[])


def latent_size(pipe: StableDiffusion, height: int | None, width: int | None) -> tuple[int, int]:
  """Latent (h, w) for an image size; the UNet's native size when not given (as diffusers)."""
  return latent_size_of(pipe.unet.config, pipe.vae.config, height, width)


def latent_size_of(unet_config, vae_config, height: int | None, width: int | None) -> tuple[int, int]:
  """latent_size from the UNet's and the VAE's configs alone."""
  factor = 2 ** (len(vae_config['block_out_channels']) - 1)
  native = unet_config['sample_size'] * factor
  height, width = height or native, width or native
  if height % factor or width % factor:
    raise ValueError(f'Image size {height}×{width} must be a multiple of the VAE downsampling factor {factor}.')
  return height // factor, width // factor


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _encode(graphdef, params, input_ids):
  return nnx.merge(graphdef, params)(input_ids)


def _run_text_encoder(module: nnx.Module, ids: np.ndarray):
  graphdef, params = nnx.split(module)
  return _encode(graphdef, params, jnp.asarray(ids, jnp.int32))


def encode_prompts(pipe: StableDiffusion, prompts: Sequence[str], *, height: int | None = None,
                   width: int | None = None, zeros: bool = False) -> Conditioning:
  """Text conditioning for `prompts`, as diffusers encodes it.

  SD 1.x/2.x: the text encoder's last hidden state (after the final layer norm). SDXL: both encoders'
  penultimate hidden states, concatenated, the second encoder's projected pooled output, and the size/crop
  time ids. With `zeros`, all-zero embeddings (SDXL's negative prompt under force_zeros_for_empty_prompt).
  """
  prompts = list(prompts)
  out = _run_text_encoder(pipe.text_encoder, tokenize(pipe.tokenizer, prompts))
  if not pipe.is_sdxl:
    context = out.last_hidden_state
    return Conditioning(jnp.zeros_like(context) if zeros else context)
  out_2 = _run_text_encoder(pipe.text_encoder_2, tokenize(pipe.tokenizer_2, prompts))
  context = jnp.concatenate([out.hidden_states[-2], out_2.hidden_states[-2]], axis=-1)
  pooled = out_2.text_embeds
  h, w = latent_size(pipe, height, width)
  factor = 2 ** (len(pipe.vae.config['block_out_channels']) - 1)
  size = [h * factor, w * factor]
  time_ids = jnp.tile(jnp.asarray([size + [0, 0] + size], jnp.float32), (len(prompts), 1))
  if zeros:
    context, pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
  return Conditioning(context, pooled, time_ids)


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _images(unet, vae, scheduler, steps, latents, cond, uncond, guidance, eta, key, dtype):
  """Guided sampling from `latents` and decoding: images in [0, 1] and the final latents (traced, under a jit)."""
  both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]).astype(dtype), uncond, cond)

  def model_fn(x, t):
    pred = unet(jnp.concatenate([x, x]).astype(dtype), t, both.context, both.added_cond_kwargs())
    pred_uncond, pred_cond = jnp.split(pred.astype(jnp.float32), 2)
    return pred_uncond + guidance * (pred_cond - pred_uncond)

  kwargs = {'key': key, 'eta': eta} if key is not None else {}
  latents, _ = scheduler.denoise(model_fn, latents, steps, **kwargs)
  images = vae.decode((latents / vae.config['scaling_factor']).astype(dtype)).astype(jnp.float32)
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0), latents


@functools.partial(jax.jit, static_argnames=('unet_def', 'vae_def', 'scheduler', 'steps', 'dtype'))
def _sample(unet_def, unet_params, vae_def, vae_params, scheduler, steps, latents, cond, uncond, guidance,
            eta, key, dtype):
  return _images(nnx.merge(unet_def, _cast(unet_params, dtype)), nnx.merge(vae_def, _cast(vae_params, dtype)),
                 scheduler, steps, latents, cond, uncond, guidance, eta, key, dtype)


@functools.partial(jax.jit, static_argnames=('layout', 'vae_def', 'scheduler', 'steps', 'models', 'dtype'))
def _sample_models(layout, shared, stacked, vae_def, vae_params, scheduler, steps, models, latents, cond, uncond,
                   guidance, eta, keys, dtype):
  """_images for every model (the UNet's `shared` parameters with model m's `stacked[k][m]` laid over them) and
  every seed (latents[s], keys[s]), vmapped over both."""
  shared = _cast(shared, dtype)

  def one_model(overlay):
    unet = layout.module({**shared, **_cast(overlay, dtype)})
    vae = nnx.merge(vae_def, _cast(vae_params, dtype))
    one_seed = lambda x, key: _images(unet, vae, scheduler, steps, x, cond, uncond, guidance, eta, key, dtype)[0]
    if keys is None:
      return jax.vmap(lambda x: one_seed(x, None))(latents)
    return jax.vmap(one_seed)(latents, keys)
  return jax.vmap(one_model, axis_size=models)(stacked)


def _initial_latents(pipe: StableDiffusion, sched, n: int, seed: int, height: int | None, width: int | None):
  """(key, latents): the sampler's key and the initial noise of n images that `seed` gives."""
  h, w = latent_size(pipe, height, width)
  key, noise_key = jax.random.split(jax.random.key(seed))
  shape = (n, h, w, pipe.unet.config['in_channels'])
  return key, jax.random.normal(noise_key, shape, jnp.float32) * sched.init_noise_sigma


def _guidance_pair(pipe: StableDiffusion, prompts: list[str], negative_prompt: str | None, height: int | None,
                   width: int | None) -> tuple[Conditioning, Conditioning]:
  """(cond, uncond) of classifier-free guidance: the prompts and, per prompt, the negative prompt (None: SDXL's
  zero embeddings; SD: the empty prompt)."""
  cond = encode_prompts(pipe, prompts, height=height, width=width)
  uncond = encode_prompts(pipe, [negative_prompt or ''] * len(prompts), height=height, width=width,
                          zeros=negative_prompt is None and pipe.is_sdxl)
  return cond, uncond


def text_to_image(pipe: StableDiffusion, prompts: Sequence[str], *, negative_prompt: str | None = '',
                  guidance_scale: float = 7.5, num_inference_steps: int = 50, seed: int = 0,
                  height: int | None = None, width: int | None = None, latents: jax.Array | None = None,
                  scheduler: str | None = 'ddim', eta: float = 0.0, dtype=jnp.float32):
  """Images (B, H, W, 3) in [0, 1] and final latents for `prompts`.

  `latents` (B, h, w, C) are the initial noise; drawn from `seed` when None. `scheduler` is 'ddim', 'pndm'
  or None (the pipeline's own scheduler class), always on the pipeline's noise schedule. A negative prompt
  of None gives SDXL's zero embeddings (SD: the empty prompt). Guidance ≤ 1 still runs the unconditional
  branch (weight 0), so outputs match diffusers for every scale > 1.
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError('text_to_image: no prompts given.')
  sched = make_scheduler(pipe.scheduler_config, scheduler)
  key, noise = _initial_latents(pipe, sched, len(prompts), seed, height, width)
  latents = noise if latents is None else latents
  cond, uncond = _guidance_pair(pipe, prompts, negative_prompt, height, width)
  unet_def, unet_params = nnx.split(pipe.unet)
  vae_def, vae_params = nnx.split(pipe.vae)
  return _sample(unet_def, unet_params, vae_def, vae_params, sched, num_inference_steps,
                 jnp.asarray(latents, jnp.float32), cond, uncond, jnp.float32(guidance_scale),
                 jnp.float32(eta), key if eta else None, dtype)


def overlay_stack(params: Mapping[str, jax.Array], overlays: Sequence[Mapping[str, jax.Array]]):
  """(shared, stacked) of models that lay `overlays` over `params` (held layout): what no model changes, and each
  changed tensor stacked over the models (only what some model changes is stacked, once per model)."""
  varied = sorted(set().union(*overlays))
  stacked = {k: jnp.stack([jnp.asarray(o.get(k, params[k]), params[k].dtype) for o in overlays]) for k in varied}
  return {k: v for k, v in params.items() if k not in stacked}, stacked


def text_to_image_models(pipe: StableDiffusion, overlays: Sequence[Mapping[str, jax.Array]], prompts: Sequence[str],
                         seeds: Sequence[int], *, negative_prompt: str | None = '', guidance_scale: float = 7.5,
                         num_inference_steps: int = 50, height: int | None = None, width: int | None = None,
                         scheduler: str | None = 'ddim', eta: float = 0.0, dtype=jnp.float32) -> np.ndarray:
  """Images (models, seeds, prompts, H, W, 3) in [0, 1] of several variants of one pipeline, in one jitted call.

  Model m is `pipe` with `overlays[m]` laid over its UNet: parameters by key in the held layout (`split_flat`'s),
  e.g. an erased model's trained tensors; {} is `pipe` itself. For seed s every model starts from the noise (and,
  with η > 0, the sampler key) that text_to_image(seed=s) draws for these prompts, so image [m, s] is
  text_to_image's for that model and seed; the text conditioning is computed once (the text encoder is shared).
  """
  prompts, seeds, overlays = list(prompts), list(seeds), list(overlays)
  if not prompts or not seeds or not overlays:
    raise ValueError('text_to_image_models: give at least one prompt, one seed and one model.')
  layout, params = split_flat(pipe.unet)
  unknown = sorted(set().union(*overlays) - set(params))
  if unknown:
    raise ValueError(f'text_to_image_models: {unknown[:3]} are not parameters of the UNet.')
  shared, stacked = overlay_stack(params, overlays)
  sched = make_scheduler(pipe.scheduler_config, scheduler)
  keys, latents = zip(*(_initial_latents(pipe, sched, len(prompts), s, height, width) for s in seeds))
  cond, uncond = _guidance_pair(pipe, prompts, negative_prompt, height, width)
  vae_def, vae_params = nnx.split(pipe.vae)
  images = _sample_models(layout, shared, stacked, vae_def, vae_params, sched, num_inference_steps, len(overlays),
                          jnp.stack(latents), cond, uncond, jnp.float32(guidance_scale), jnp.float32(eta),
                          jnp.stack(keys) if eta else None, dtype)
  return np.asarray(images)
