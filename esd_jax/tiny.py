"""A small randomly initialised SD 1.x-structured pipeline, built by esd-jax alone (no torch, no download).

Stands in where no trained weights exist: smoke runs of every command, benchmarks of a small UNet.
Images from it are noise-like by nature; the structure, file formats and code paths are the real ones.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from esd_jax.models import build, clip
from esd_jax.pipeline import StableDiffusion

WORDS = ('a', 'photo', 'of', 'painting', 'in', 'the', 'style', 'cat', 'dog', 'car', 'church', 'van', 'gogh')

UNET = {
    '_class_name': 'UNet2DConditionModel', 'sample_size': 16, 'in_channels': 4, 'out_channels': 4,
    'block_out_channels': [32, 64], 'layers_per_block': 1, 'norm_num_groups': 8, 'cross_attention_dim': 32,
    'attention_head_dim': 4, 'down_block_types': ['CrossAttnDownBlock2D', 'DownBlock2D'],
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D'],
}
VAE = {
    '_class_name': 'AutoencoderKL', 'block_out_channels': [16, 32], 'latent_channels': 4, 'norm_num_groups': 8,
    'down_block_types': ['DownEncoderBlock2D'] * 2, 'up_block_types': ['UpDecoderBlock2D'] * 2, 'sample_size': 32,
}
SCHEDULER = {
    '_class_name': 'DDIMScheduler', 'beta_start': 0.00085, 'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
    'clip_sample': False, 'set_alpha_to_one': False, 'steps_offset': 1, 'num_train_timesteps': 1000,
}


TEXT_ENCODER = {  # vocab_size and eos_token_id from the tokenizer: models.clip.for_vocabulary
    'architectures': ['CLIPTextModel'], 'hidden_size': 32, 'intermediate_size': 64, 'num_attention_heads': 2,
    'num_hidden_layers': 2, 'max_position_embeddings': 16, 'hidden_act': 'quick_gelu',
}


def random_pipeline(folder: str | os.PathLike, *, seed: int = 0, unet: dict = UNET, vae: dict = VAE,
                    text_encoder: dict = TEXT_ENCODER, max_length: int = 16) -> StableDiffusion:
  """Builds a random pipeline (by default the small one of this module; any UNet / VAE / text encoder configs,
  e.g. SD 1.4's, with this module's small vocabulary), saves it as a diffusers folder at `folder`, returns it."""
  from transformers import CLIPTokenizer

  from convert.diffusers_format import save_pipeline
  from esd_jax.tokenizer import write_clip_tokenizer

  with tempfile.TemporaryDirectory() as tmp:  # save_pipeline copies the tokenizer into the folder
    write_clip_tokenizer(Path(tmp) / 'tokenizer', WORDS, model_max_length=max_length)
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(tmp) / 'tokenizer'))
  pipe = StableDiffusion(unet=build(unet, seed=seed), vae=build(vae, seed=seed + 1),
                         text_encoder=build(clip.for_vocabulary(text_encoder, len(tokenizer)), seed=seed + 2),
                         tokenizer=tokenizer, scheduler_config=dict(SCHEDULER))
  save_pipeline(pipe, folder)
  return pipe
