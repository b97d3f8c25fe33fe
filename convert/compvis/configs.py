"""Diffusers configs for single files: the ones our files store, or SD1/SD2 configs inferred from shapes.

Files we write store the diffusers configs (unet, vae, text_encoder, scheduler) as JSON in the
safetensors `__metadata__` under CONFIG_METADATA_KEY ('esd_jax.configs'), so they read back exactly;
for other files `infer_configs` derives SD1/SD2 configs from the tensor shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.compvis.links import _indices, _text_diffusers_keys
from esd_jax.files import parse_json

# safetensors `__metadata__` entry holding our diffusers configs as JSON:
# {"unet": {...}, "vae": {...}, "text_encoder": {...}, "scheduler": {...}}.
CONFIG_METADATA_KEY = 'esd_jax.configs'

_V_PREDICTION_HINT = ("SD2's 768-px models (stable-diffusion-2, 2-1) are 'v_prediction'; the 512-px base "
                      "models (2-base, 2-1-base) and SD1 are 'epsilon'")


def stored_configs(metadata: Mapping[str, str], *, source: str = 'checkpoint') -> dict | None:
  """The diffusers configs `write_single_file` stored in a file's metadata, or None if it has none."""
  text = (metadata or {}).get(CONFIG_METADATA_KEY)
  if text is None:
    return None
  return parse_json(text, f'{source} metadata entry {CONFIG_METADATA_KEY!r}')


def _shape(value) -> tuple[int, ...]:
  shape = getattr(value, 'shape', None)
  return tuple(shape) if shape is not None else np.shape(value())


def infer_configs(components: Mapping[str, Mapping[str, Any]], *, prediction_type: str | None = None) -> dict:
  """SD1/SD2 diffusers configs (unet, vae, text_encoder, scheduler) from the shapes of diffusers-keyed
  components, for files that do not carry ours.

  A UNet with linear proj_in/out is SD2: head dim 64 (attention_head_dim = block width / 64), an OpenCLIP
  (GELU) text encoder; otherwise SD1: 8 heads, OpenAI CLIP (QuickGELU). The text encoder gets head dim
  64. What shapes cannot tell takes the SD default (32 norm groups, eps, scaling factor 0.18215, token ids).
  `prediction_type` ('epsilon' or 'v_prediction') is the caller's to give for SD2: the 768-px models are
  v-prediction, the 512-px base models epsilon; SD1 defaults to 'epsilon'. It also sets the sample size
  (768 px for v-prediction, else 512).
  """
  if 'unet' not in components:
    raise ValueError('infer_configs needs the UNet to tell SD1 from SD2.')
  unet = _infer_unet(components['unet'])
  sd2 = unet['use_linear_projection']
  if prediction_type is None:
    if sd2:
      raise ValueError('This is an SD2 checkpoint: pass prediction_type, since the weights do not say it. '
                       + _V_PREDICTION_HINT + '.')
    prediction_type = 'epsilon'
  if prediction_type not in ('epsilon', 'v_prediction'):
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}.")
  image = 768 if prediction_type == 'v_prediction' else 512
  configs = {'unet': unet, 'scheduler': {
      '_class_name': 'DDIMScheduler', 'beta_start': 0.00085, 'beta_end': 0.012,
      'beta_schedule': 'scaled_linear', 'num_train_timesteps': 1000, 'clip_sample': False,
      'set_alpha_to_one': False, 'steps_offset': 1,
      'prediction_type': prediction_type, 'timestep_spacing': 'leading'}}
  scale = 8
  if 'vae' in components:
    configs['vae'] = _infer_vae(components['vae'], image)
    scale = 2 ** (len(configs['vae']['block_out_channels']) - 1)
  unet['sample_size'] = image // scale
  if 'text_encoder' in components:
    configs['text_encoder'] = _infer_text(components['text_encoder'], open_clip=sd2)
  return configs


def _infer_unet(sd: Mapping[str, Any]) -> dict:
  if any(k.startswith(('add_embedding.', 'class_embedding.')) for k in sd):
    raise ValueError('infer_configs handles SD1/SD2 UNets; this one has class/added-condition embeddings '
                     '(SDXL or a variant): give its config explicitly.')
  keys = set(sd)
  n = len(_indices(keys, 'down_blocks'))
  widths = [_shape(sd[f'down_blocks.{i}.resnets.0.conv1.weight'])[0] for i in range(n)]
  layers = [len(_indices(keys, f'down_blocks.{i}.resnets')) for i in range(n)]
  down_attn = [bool(_indices(keys, f'down_blocks.{i}.attentions')) for i in range(n)]
  up_attn = [bool(_indices(keys, f'up_blocks.{i}.attentions')) for i in range(n)]
  depth = [len(_indices(keys, f'down_blocks.{i}.attentions.0.transformer_blocks')) or 1 for i in range(n)]
  attention = next((k for k in sorted(keys) if k.endswith('.attentions.0.proj_in.weight')), None)
  cross = next((k for k in sorted(keys) if k.endswith('.attn2.to_k.weight')), None)
  if attention is None or cross is None:
    raise ValueError('infer_configs: the UNet has no cross-attention blocks; this is not an SD1/SD2 UNet.')
  linear = len(_shape(sd[attention])) == 2
  if linear and any(w % 64 for w in widths):
    raise ValueError(f'infer_configs: block widths {widths} are not multiples of the head dim 64 of SD2 '
                     'UNets; give the UNet config explicitly.')
  config = {
      '_class_name': 'UNet2DConditionModel', 'act_fn': 'silu',
      'attention_head_dim': [w // 64 for w in widths] if linear else 8,
      'block_out_channels': widths, 'center_input_sample': False, 'cross_attention_dim': _shape(sd[cross])[1],
      'down_block_types': ['CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in down_attn],
      'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0,
      'in_channels': _shape(sd['conv_in.weight'])[1],
      'layers_per_block': layers[0] if len(set(layers)) == 1 else layers,
      'mid_block_scale_factor': 1, 'norm_eps': 1e-5, 'norm_num_groups': 32,
      'out_channels': _shape(sd['conv_out.weight'])[0], 'sample_size': None,
      'up_block_types': ['CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in up_attn],
      'use_linear_projection': linear,
  }
  if set(depth) != {1}:
    config['transformer_layers_per_block'] = depth
  return config


def _infer_vae(sd: Mapping[str, Any], image: int) -> dict:
  keys = set(sd)
  n = len(_indices(keys, 'encoder.down_blocks'))
  widths = [_shape(sd[f'encoder.down_blocks.{i}.resnets.0.conv1.weight'])[0] for i in range(n)]
  return {
      '_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'block_out_channels': widths,
      'down_block_types': ['DownEncoderBlock2D'] * n, 'in_channels': _shape(sd['encoder.conv_in.weight'])[1],
      'latent_channels': _shape(sd['decoder.conv_in.weight'])[1],
      'layers_per_block': len(_indices(keys, 'encoder.down_blocks.0.resnets')), 'norm_num_groups': 32,
      'out_channels': _shape(sd['decoder.conv_out.weight'])[0], 'sample_size': image,
      'scaling_factor': 0.18215, 'up_block_types': ['UpDecoderBlock2D'] * n,
  }


def _infer_text(sd: Mapping[str, Any], *, open_clip: bool) -> dict:
  sd = {k.removeprefix('text_model.'): v for k, v in _text_diffusers_keys(sd).items()}
  vocab, hidden = _shape(sd['embeddings.token_embedding.weight'])
  if hidden % 64:
    raise ValueError(f'infer_configs: text encoder width {hidden} is not a multiple of the head dim 64 of '
                     'the CLIP text encoders of SD1/SD2; give its config explicitly.')
  return {
      'architectures': ['CLIPTextModelWithProjection' if 'text_projection.weight' in sd else 'CLIPTextModel'],
      'model_type': 'clip_text_model', 'hidden_act': 'gelu' if open_clip else 'quick_gelu',
      'hidden_size': hidden, 'intermediate_size': _shape(sd['encoder.layers.0.mlp.fc1.weight'])[0],
      'num_attention_heads': hidden // 64, 'num_hidden_layers': len(_indices(set(sd), 'encoder.layers')),
      'max_position_embeddings': _shape(sd['embeddings.position_embedding.weight'])[0], 'vocab_size': vocab,
      'layer_norm_eps': 1e-5, 'bos_token_id': 0, 'eos_token_id': 2, 'pad_token_id': 1,
  }

