"""CompVis (ldm) single-file checkpoints ⇄ diffusers/transformers state dicts, as pure key transforms.

A1111 and ComfyUI load Stable Diffusion as one file in the CompVis layout: the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, the text encoder under `cond_stage_model.`
(SD1: OpenAI CLIP-L at `transformer.text_model.*`; SD2: OpenCLIP ViT-H at `model.*`, with q/k/v fused
into `attn.in_proj_weight`). Our models use the diffusers/transformers names.

  links    the key correspondence, one description for both directions, and the per-component
           functions (`unet_to_compvis`, `unet_from_compvis`, `vae_*`, `text_encoder_*`);
  configs  the diffusers configs our files store (`stored_configs`), or SD1/SD2 configs inferred from
           tensor shapes for other files (`infer_configs`);
  files    whole files: `read_single_file`, `write_single_file`.

What the file has and our models lack travels as `extras` (full CompVis keys → tensors), which
`write_single_file` re-emits, so reading and writing a file loses nothing:
  * SD2: diffusers' text encoder has 23 layers where the file's OpenCLIP has 24 (SD2 conditions on the
    penultimate layer, and diffusers drops the last one); the last resblock, `text_projection` and
    `logit_scale` are extras. Without a stored config, the text encoder read from an OpenCLIP file has
    one layer fewer than a complete tower (one with `text_projection`), as diffusers does; a file
    converted from diffusers (23 layers, no projection) keeps all its layers. A text encoder written
    without those extras yields such a file.
  * SD1: `transformer.text_model.embeddings.position_ids` (a buffer, not a parameter).
  * Everything outside the three component prefixes (`alphas_cumprod`, `betas`, `model_ema.*`, ...).
    Note that `model_ema.*` are the EMA weights of the UNet as it was read: drop them from the extras
    when writing a modified UNet if a consumer might prefer them.

Supported layouts: UNets of CrossAttnDownBlock2D/DownBlock2D and CrossAttnUpBlock2D/UpBlock2D blocks
with a UNetMidBlock2DCrossAttn (SD1 conv proj_in/out, SD2 linear), any number of blocks, layers per
block (int or per-block list) and transformer layers; SDXL's `label_emb.0.{0,2}` ⇄
`add_embedding.linear_{1,2}` (and `class_embedding` for class_embed_type projection/timestep or
num_class_embeds). AutoencoderKL VAEs of any depth. Whole SDXL single files (`conditioner.*`) are
rejected: their two text encoders are not mapped here.
"""

from convert.compvis.configs import CONFIG_METADATA_KEY, infer_configs, stored_configs
from convert.compvis.files import read_safetensors, read_single_file, write_single_file
from convert.compvis.links import (TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, LazyTensor, text_encoder_from_compvis,
                                   text_encoder_to_compvis, unet_from_compvis, unet_to_compvis, vae_from_compvis,
                                   vae_to_compvis)

__all__ = ['CONFIG_METADATA_KEY', 'TEXT_PREFIX', 'UNET_PREFIX', 'VAE_PREFIX', 'LazyTensor', 'infer_configs',
           'read_safetensors', 'read_single_file', 'stored_configs', 'text_encoder_from_compvis',
           'text_encoder_to_compvis', 'unet_from_compvis', 'unet_to_compvis', 'vae_from_compvis',
           'vae_to_compvis', 'write_single_file']
