"""Trains the shapes-world text-to-image model: Stable Diffusion's structure, small, from one seed.

Three stages, each on freshly drawn images of the world (esd_jax.shapes_world.world), with this project's Flax models:
1. the VAE (64×64×3 ↔ 8×8×4): L1 + L2 reconstruction of a posterior sample and a small KL term;
2. its `scaling_factor`, set as Stable Diffusion's was: 1 / std of the latents, so they enter the
   diffusion at unit scale;
3. the UNet and the CLIP text encoder together, on the ε-prediction objective of SD's noise schedule, the
   captions of world.captions (10 % empty: classifier-free guidance), parameters averaged (EMA).
The result is saved as a diffusers pipeline folder (DDIM scheduler, a tokenizer in which every world word is
one token); `main.py train_world` runs it (configs/train_world.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.shapes_world import world
from esd_jax.shapes_world.fit import fit
from esd_jax.models import build, clip
from esd_jax.pipeline import StableDiffusion
from esd_jax.schedulers import make_scheduler
from esd_jax.tiny import SCHEDULER
from esd_jax.tokenizer import tokenize

MAX_TOKENS = 8  # <start> + at most three words + <end>, padded

VAE = {
    '_class_name': 'AutoencoderKL', 'in_channels': 3, 'out_channels': 3, 'latent_channels': 4,
    'block_out_channels': [16, 32, 64, 64], 'layers_per_block': 1, 'norm_num_groups': 8,
    'down_block_types': ['DownEncoderBlock2D'] * 4, 'up_block_types': ['UpDecoderBlock2D'] * 4,
    'sample_size': world.SIZE, 'scaling_factor': 1.0,
}
UNET = {
    '_class_name': 'UNet2DConditionModel', 'sample_size': 8, 'in_channels': 4, 'out_channels': 4,
    'block_out_channels': [32, 64, 64], 'layers_per_block': 1, 'norm_num_groups': 8,
    'cross_attention_dim': 64, 'attention_head_dim': 4,
    'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
}


TEXT_ENCODER = {  # vocab_size and eos_token_id from the tokenizer: models.clip.for_vocabulary
    'architectures': ['CLIPTextModel'], 'hidden_size': 64, 'intermediate_size': 128, 'num_attention_heads': 4,
    'num_hidden_layers': 2, 'max_position_embeddings': MAX_TOKENS, 'hidden_act': 'quick_gelu',
}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything that determines the trained weights (with the backend)."""
  seed: int = 0
  vae_steps: int = 1500
  vae_batch: int = 8
  vae_learning_rate: float = 1e-3
  kl_weight: float = 1e-4
  unet_steps: int = 3000
  unet_batch: int = 64
  unet_learning_rate: float = 1e-3
  ema_decay: float = 0.998


def world_tokenizer(folder: str | os.PathLike):
  """Writes the world's CLIP tokenizer (each of world.WORDS one token) to `folder` and loads it."""
  from transformers import CLIPTokenizer

  from esd_jax.tokenizer import write_clip_tokenizer
  write_clip_tokenizer(folder, world.WORDS, model_max_length=MAX_TOKENS)
  return CLIPTokenizer.from_pretrained(str(folder))


def _pixels(images_u8) -> jax.Array:
  return jnp.asarray(images_u8, jnp.float32) / 127.5 - 1


def vae_loss(vae: nnx.Module, key: jax.Array, images: jax.Array, kl_weight: float) -> jax.Array:
  """L1 + L2 reconstruction of a posterior sample, plus kl_weight × KL(posterior ‖ N(0, 1)) per latent."""
  mean, logvar = vae.encode(images)
  out = vae.decode(vae.sample_latent(mean, logvar, key))
  kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1 - logvar)
  return jnp.mean(jnp.abs(out - images)) + jnp.mean(jnp.square(out - images)) + kl_weight * kl


def train_vae(recipe: Recipe, *, log_every: int = 100):
  """The trained VAE (scaling_factor still 1) and its loss log."""
  vae = build(VAE, seed=recipe.seed)
  graphdef, params = nnx.split(vae)
  loss = lambda p, key, images: vae_loss(nnx.merge(graphdef, p), key, _pixels(images), recipe.kl_weight)
  params, history = fit(params, loss, lambda rng: (world.sample(rng, recipe.vae_batch)[0],),
                        steps=recipe.vae_steps, seed=recipe.seed, learning_rate=recipe.vae_learning_rate,
                        desc='vae', log_every=log_every)
  return nnx.merge(graphdef, params), history


@nnx.jit
def _posterior(vae: nnx.Module, images: jax.Array):
  return vae.encode(images)


def latent_scale(vae: nnx.Module, *, n: int = 2048, seed: int = 1) -> float:
  """1 / std of the posterior means of n world images (how SD chose 0.18215)."""
  mean, _ = _posterior(vae, _pixels(world.sample(seed, n)[0]))
  return float(1.0 / jnp.std(mean))


def denoiser_loss(unet: nnx.Module, text_encoder: nnx.Module, scheduler, key: jax.Array, latents: jax.Array,
                  input_ids: jax.Array) -> jax.Array:
  """Stable Diffusion's training objective: ‖ε − ε_θ(x_t, t, text)‖², t uniform over the train timesteps."""
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, (latents.shape[0],), 0, scheduler.num_train_timesteps)
  noise = jax.random.normal(noise_key, latents.shape)
  context = text_encoder(input_ids).last_hidden_state
  prediction = unet(scheduler.add_noise(latents, noise, t), t, context)
  return jnp.mean(jnp.square(prediction - noise))


def train_denoiser(vae: nnx.Module, tokenizer, recipe: Recipe, *, log_every: int = 100):
  """The trained (EMA) UNet and text encoder, and their loss log. The VAE stays frozen."""
  scheduler = make_scheduler(SCHEDULER)
  unet = build(UNET, seed=recipe.seed + 1)
  text_encoder = build(clip.for_vocabulary(TEXT_ENCODER, len(tokenizer)), seed=recipe.seed + 2)
  (unet_def, unet_params), (text_def, text_params) = nnx.split(unet), nnx.split(text_encoder)
  vae_def, vae_params = nnx.split(vae)
  scale = vae.config['scaling_factor']

  def next_batch(rng):
    images, _, _, captions = world.sample(rng, recipe.unet_batch)
    return images, jnp.asarray(tokenize(tokenizer, captions), jnp.int32)

  def loss(params, key, images, input_ids):
    encode_key, key = jax.random.split(key)
    mean, logvar = nnx.merge(vae_def, vae_params).encode(_pixels(images))
    latents = vae.sample_latent(mean, logvar, encode_key) * scale
    return denoiser_loss(nnx.merge(unet_def, params['unet']), nnx.merge(text_def, params['text']), scheduler,
                         key, latents, input_ids)

  params, history = fit({'unet': unet_params, 'text': text_params}, loss, next_batch,
                        steps=recipe.unet_steps, seed=recipe.seed + 1, learning_rate=recipe.unet_learning_rate,
                        ema_decay=recipe.ema_decay, desc='unet + text encoder', log_every=log_every)
  return nnx.merge(unet_def, params['unet']), nnx.merge(text_def, params['text']), history


def train_world_model(folder: str | os.PathLike, recipe: Recipe = Recipe()) -> tuple[StableDiffusion, dict]:
  """Trains the three components and saves the pipeline to `folder` (atomically) with `training.json`,
  the recipe, loss logs and stage times. Returns the pipeline and that record."""
  import tempfile

  from convert.diffusers_format import save_pipeline
  from esd_jax.files import write_json

  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = world_tokenizer(Path(tmp) / 'tokenizer')
  times = {}
  start = time.perf_counter()
  vae, vae_log = train_vae(recipe)
  times['vae_s'] = time.perf_counter() - start
  scale = latent_scale(vae)
  vae = _with_config(vae, scaling_factor=round(scale, 5))
  start = time.perf_counter()
  unet, text_encoder, unet_log = train_denoiser(vae, tokenizer, recipe)
  times['unet_and_text_encoder_s'] = time.perf_counter() - start
  pipe = StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         scheduler_config=dict(SCHEDULER))
  record = {'recipe': dataclasses.asdict(recipe), 'scaling_factor': round(scale, 5),
            'seconds': {k: round(v, 1) for k, v in times.items()}, 'backend': jax.default_backend(),
            'jax': jax.__version__, 'vae_loss': vae_log, 'denoiser_loss': unet_log}
  save_pipeline(pipe, folder)
  write_json(Path(folder) / 'training.json', record)
  return pipe, record


def _with_config(module: nnx.Module, **changes) -> nnx.Module:
  """The same parameters in a module whose config has `changes` (configs are frozen at construction)."""
  from esd_jax.models import build_abstract
  from esd_jax.models.state_dict import load_state_dict, state_dict
  config = {**module.config, '_class_name': type(module).__name__, **changes}
  return load_state_dict(build_abstract(config), state_dict(module))
