"""Small random diffusers pipelines (PyTorch) saved as folders: the reference for pipeline-level tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from esd_jax.tokenizer import write_clip_tokenizer

WORDS = ['a', 'photo', 'of', 'red', 'green', 'blue', 'circle', 'square', 'cat', 'dog', 'painting', 'style']
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


def _text_encoder(cls, vocab_size, hidden, **kw):
  torch.manual_seed(1)
  config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=16,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **kw)
  return cls(config).eval()


def _vae():
  torch.manual_seed(2)
  return AutoencoderKL(block_out_channels=(16, 32), down_block_types=('DownEncoderBlock2D',) * 2,
                       up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, norm_num_groups=8,
                       sample_size=32).eval()


def make_sd(folder: Path, *, sd2: bool = False) -> StableDiffusionPipeline:
  """SD1-like (conv projections, int heads) or SD2-like (linear projections, head dims, v-prediction)."""
  write_clip_tokenizer(folder / 'tok', WORDS, model_max_length=16)
  tokenizer = CLIPTokenizer.from_pretrained(str(folder / 'tok'))
  hidden = 48 if sd2 else 32
  text_encoder = _text_encoder(CLIPTextModel, len(tokenizer), hidden, hidden_act='gelu' if sd2 else 'quick_gelu')
  torch.manual_seed(3)
  unet = UNet2DConditionModel(
      sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
      cross_attention_dim=hidden, attention_head_dim=[4, 8] if sd2 else 4,
      use_linear_projection=sd2, upcast_attention=sd2,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))
  scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type='v_prediction' if sd2 else 'epsilon')
  pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
  pipe.save_pretrained(folder / 'pipe')
  return pipe


def make_sdxl(folder: Path) -> StableDiffusionXLPipeline:
  write_clip_tokenizer(folder / 'tok', WORDS, model_max_length=16)
  tokenizer = CLIPTokenizer.from_pretrained(str(folder / 'tok'))
  te1 = _text_encoder(CLIPTextModel, len(tokenizer), 32, hidden_act='quick_gelu')
  te2 = _text_encoder(CLIPTextModelWithProjection, len(tokenizer), 32, hidden_act='gelu', projection_dim=32)
  torch.manual_seed(3)
  unet = UNet2DConditionModel(
      sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=64,
      attention_head_dim=[4, 8], use_linear_projection=True, transformer_layers_per_block=[1, 2],
      addition_embed_type='text_time', addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'))
  pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                   tokenizer_2=tokenizer, unet=unet.eval(), scheduler=DDIMScheduler(**SD_SCHEDULER))
  pipe.save_pretrained(folder / 'pipe')
  return pipe
