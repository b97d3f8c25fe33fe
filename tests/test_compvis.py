"""CompVis single-file layout ⇄ diffusers keys: checked against diffusers' own single-file converters,
then round trips through our reader and writer, config inference, and failure modes."""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as ref
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from convert.compvis import (CONFIG_METADATA_KEY, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, LazyTensor,
                             infer_configs, read_single_file, stored_configs, text_encoder_from_compvis,
                             text_encoder_to_compvis, unet_from_compvis, unet_to_compvis, vae_from_compvis,
                             vae_to_compvis, write_single_file)
from tests.reference import numpy_state, randomize

# Tiny configs written exactly as infer_configs describes SD1/SD2 models (so inference can be checked
# against them); sample sizes follow from the 2-level VAE (scale 2): 512 px → 256, 768 px → 384.
_UNET = {
    '_class_name': 'UNet2DConditionModel', 'act_fn': 'silu', 'center_input_sample': False,
    'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 4,
    'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-5, 'norm_num_groups': 32,
    'out_channels': 4, 'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
}
SD1_UNET = {**_UNET, 'attention_head_dim': 8, 'block_out_channels': [32, 32, 64], 'cross_attention_dim': 64,
            'sample_size': 256, 'use_linear_projection': False}
SD2_UNET = {**_UNET, 'attention_head_dim': [1, 1, 2], 'block_out_channels': [64, 64, 128],
            'cross_attention_dim': 64, 'sample_size': 384, 'use_linear_projection': True}
SDXL_UNET = {**_UNET, 'down_block_types': ['DownBlock2D', 'CrossAttnDownBlock2D'],
             'up_block_types': ['CrossAttnUpBlock2D', 'UpBlock2D'], 'block_out_channels': [32, 64],
             'attention_head_dim': [1, 2], 'cross_attention_dim': 32, 'use_linear_projection': True,
             'transformer_layers_per_block': [1, 2], 'addition_embed_type': 'text_time',
             'addition_time_embed_dim': 8, 'projection_class_embeddings_input_dim': 80, 'sample_size': 32}
VAE = {'_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'block_out_channels': [32, 64],
       'down_block_types': ['DownEncoderBlock2D'] * 2, 'in_channels': 3, 'latent_channels': 4,
       'layers_per_block': 2, 'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 512,
       'scaling_factor': 0.18215, 'up_block_types': ['UpDecoderBlock2D'] * 2}
_TEXT = {'architectures': ['CLIPTextModel'], 'model_type': 'clip_text_model', 'hidden_size': 64,
         'intermediate_size': 128, 'num_attention_heads': 1, 'num_hidden_layers': 2,
         'max_position_embeddings': 16, 'vocab_size': 100, 'layer_norm_eps': 1e-5, 'bos_token_id': 0,
         'eos_token_id': 2, 'pad_token_id': 1}
SD1_TEXT = {**_TEXT, 'hidden_act': 'quick_gelu'}
SD2_TEXT = {**_TEXT, 'hidden_act': 'gelu'}


def _scheduler(prediction_type):
  return {'_class_name': 'DDIMScheduler', 'beta_start': 0.00085, 'beta_end': 0.012,
          'beta_schedule': 'scaled_linear', 'num_train_timesteps': 1000, 'clip_sample': False,
          'set_alpha_to_one': False, 'steps_offset': 1, 'prediction_type': prediction_type,
          'timestep_spacing': 'leading'}


def _unet(config, seed=0):
  return numpy_state(randomize(UNet2DConditionModel.from_config(config), seed))


def _vae(seed=1):
  return numpy_state(randomize(AutoencoderKL.from_config(VAE), seed))


def _text_model(config, seed=2):
  projection = 'CLIPTextModelWithProjection' in config['architectures']
  cls = CLIPTextModelWithProjection if projection else CLIPTextModel
  return randomize(cls(CLIPTextConfig(**config)), seed)


def _text(config, seed=2):
  """Keys as SD checkpoints spell them (transformers 5 drops `text_model.` from a CLIPTextModel it built)."""
  return {k if k.startswith(('text_model.', 'text_projection.')) else 'text_model.' + k: v
          for k, v in numpy_state(_text_model(config, seed)).items()}


def _torch(sd, prefix):
  return {prefix + k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}


def _assert_same(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    g, w = np.asarray(got[k]() if callable(got[k]) else got[k]), np.asarray(want[k])
    assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), k


# ---- the mapping, checked against diffusers' own converters ----------------------------------------


@pytest.mark.parametrize('config', [SD1_UNET, SD2_UNET, SDXL_UNET], ids=['sd1', 'sd2', 'sdxl'])
def test_unet_matches_diffusers_converter(config):
  sd = _unet(config)
  ours = unet_to_compvis(sd, config)
  _assert_same(ref.convert_ldm_unet_checkpoint(_torch(ours, UNET_PREFIX), config), sd)
  _assert_same(unet_from_compvis(ours, config), sd)
  _assert_same(unet_from_compvis(ours), sd)  # structure read off the CompVis keys


def test_unet_sd1_layout_names():
  """Spot checks of the CompVis names themselves, as the ldm code spells them."""
  ours = unet_to_compvis(_unet(SD1_UNET), SD1_UNET)
  for key in ['time_embed.0.weight', 'input_blocks.0.0.weight', 'input_blocks.3.0.op.weight',
              'input_blocks.1.1.proj_in.weight', 'input_blocks.7.0.skip_connection.weight',
              'input_blocks.4.0.emb_layers.1.weight', 'middle_block.1.transformer_blocks.0.attn2.to_k.weight',
              'middle_block.2.out_layers.3.weight', 'output_blocks.2.1.conv.weight',
              'output_blocks.5.2.conv.weight', 'output_blocks.8.1.proj_out.weight', 'out.0.weight',
              'out.2.bias']:
    assert key in ours, key
  assert ours['input_blocks.1.1.proj_in.weight'].shape == (32, 32, 1, 1)
  assert 'input_blocks.1.0.skip_connection.weight' not in ours


def test_unet_uneven_layers_per_block():
  config = {**SD1_UNET, 'layers_per_block': [1, 2, 1]}
  sd = _unet(config)
  ours = unet_to_compvis(sd, config)
  # down: conv_in, 1 resnet, op, 2 resnets, op, 1 resnet; up (deepest first): 2, 3, 2 layers
  assert 'input_blocks.5.0.op.weight' in ours and 'input_blocks.6.0.in_layers.0.weight' in ours
  assert 'input_blocks.7.0.in_layers.0.weight' not in ours
  assert 'output_blocks.1.1.conv.weight' in ours and 'output_blocks.4.2.conv.weight' in ours
  assert len({k.split('.')[1] for k in ours if k.startswith('output_blocks.')}) == 7
  _assert_same(unet_from_compvis(ours), sd)


def test_vae_matches_diffusers_converter():
  sd = _vae()
  ours = vae_to_compvis(sd, VAE)
  assert ours['encoder.mid.attn_1.q.weight'].shape == (64, 64, 1, 1)
  assert 'decoder.up.1.upsample.conv.weight' in ours and 'decoder.up.0.block.0.nin_shortcut.weight' in ours
  _assert_same(ref.convert_ldm_vae_checkpoint(_torch(ours, VAE_PREFIX), VAE), sd)
  _assert_same(vae_from_compvis(ours, VAE), sd)
  _assert_same(vae_from_compvis(ours), sd)


def test_vae_legacy_conv1d_attention_weights():
  sd = _vae()
  ours = vae_to_compvis(sd, VAE)
  ours['decoder.mid.attn_1.proj_out.weight'] = ours['decoder.mid.attn_1.proj_out.weight'][..., 0]  # [C, C, 1]
  _assert_same(vae_from_compvis(ours, VAE), sd)


@pytest.mark.parametrize('config', [SD1_TEXT, SD2_TEXT,
                                    {**SD2_TEXT, 'architectures': ['CLIPTextModelWithProjection']}],
                         ids=['clip', 'open_clip', 'open_clip_projection'])
def test_text_encoder_matches_diffusers_converter(config):
  model = _text_model(config)
  sd = _text(config)
  ours = text_encoder_to_compvis(sd, config)
  ckpt = _torch(ours, TEXT_PREFIX)
  if config['hidden_act'] == 'gelu':
    assert ours['model.transformer.resblocks.0.attn.in_proj_weight'].shape == (192, 64)
    # diffusers skips `cond_stage_model.model.text_projection` (SD2's text encoder has none), so check
    # the projection under the other prefix its OpenCLIP converter serves (SDXL's second encoder).
    ckpt = _torch(ours, 'conditioner.embedders.1.')
    theirs = ref.convert_open_clip_checkpoint(model, ckpt, prefix='conditioner.embedders.1.model.')
  else:
    assert 'transformer.text_model.encoder.layers.1.mlp.fc2.bias' in ours
    theirs = ref.convert_ldm_clip_checkpoint(ckpt)
  _assert_same(theirs, sd)
  mapped, extras = text_encoder_from_compvis(ours, config)
  assert extras == {}
  _assert_same(mapped, sd)
  if config['hidden_act'] != 'gelu':  # (OpenCLIP without a config drops the last layer: tested below)
    _assert_same(text_encoder_from_compvis(ours)[0], sd)
  # the names transformers 5 gives a CLIPTextModel it built (no `text_model.`) are accepted too
  flat = {k.removeprefix('text_model.'): v for k, v in sd.items()}
  _assert_same(text_encoder_to_compvis(flat, config), ours)


def test_open_clip_extras_keep_the_file_whole():
  """An SD2 file has one OpenCLIP layer more than diffusers' text encoder, plus projection and logit scale."""
  tower = {**SD2_TEXT, 'num_hidden_layers': 3}
  full = text_encoder_to_compvis(_text(tower), tower)
  full['model.text_projection'] = np.ones((64, 64), np.float32)
  full['model.logit_scale'] = np.array(4.6, np.float32)
  for config in (SD2_TEXT, None):
    mapped, extras = text_encoder_from_compvis(full, config)
    assert sorted(extras) == sorted(k for k in full if 'resblocks.2.' in k or k in (
        'model.text_projection', 'model.logit_scale'))
    _assert_same({**text_encoder_to_compvis(mapped, SD2_TEXT), **extras}, full)
  # A file converted from diffusers holds only the layers diffusers had, and no projection: keep them all.
  cut = {k: v for k, v in full.items() if 'resblocks.2.' not in k and k != 'model.text_projection'}
  mapped, extras = text_encoder_from_compvis(cut)
  assert list(extras) == ['model.logit_scale']
  _assert_same(text_encoder_to_compvis(mapped, SD2_TEXT), {k: v for k, v in cut.items() if k not in extras})


def test_clip_legacy_keys_without_text_model():
  sd = _text(SD1_TEXT)
  ours = text_encoder_to_compvis(sd, SD1_TEXT)
  old = {k.replace('transformer.text_model.', 'transformer.'): v for k, v in ours.items()}
  old['transformer.embeddings.position_ids'] = np.arange(16)[None]
  mapped, extras = text_encoder_from_compvis(old)
  _assert_same(mapped, sd)
  assert list(extras) == ['transformer.text_model.embeddings.position_ids']


def test_mismatched_config_is_an_error():
  sd = _unet(SD1_UNET)
  ours = unet_to_compvis(sd, SD1_UNET)
  with pytest.raises(KeyError, match='no counterpart'):
    unet_from_compvis(ours, {**SD1_UNET, 'layers_per_block': 1})
  with pytest.raises(KeyError, match='no CompVis tensors for'):
    unet_from_compvis({k: v for k, v in ours.items() if not k.startswith('middle_block.1.')}, SD1_UNET)
  with pytest.raises(KeyError, match='bogus'):
    unet_to_compvis({**sd, 'bogus.weight': np.zeros(1)}, SD1_UNET)
  with pytest.raises(ValueError, match='UNetMidBlock2DCrossAttn'):
    unet_to_compvis(sd, {**SD1_UNET, 'mid_block_type': None})


_REFERENCE = os.path.join(os.path.dirname(__file__), '..', 'esd_jax', 'models', 'reference_configs')


def _reference(model, component):
  with open(os.path.join(_REFERENCE, model, component, 'config.json')) as f:
    return json.load(f)


@pytest.mark.parametrize('model', ['sd-v1-4', 'sd-v2-1', 'sdxl-base-1.0'])
def test_full_size_layouts(model):
  """The real models' layouts, on the meta device (shapes only, no memory): our CompVis keys are those
  diffusers' converters turn back into the model's own, and infer_configs recovers the real configs."""
  configs = {c: _reference(model, c) for c in ('unet', 'vae')}
  if model != 'sdxl-base-1.0':
    configs['text_encoder'] = _reference(model, 'text_encoder')
  with torch.device('meta'):
    components = {'unet': UNet2DConditionModel.from_config(configs['unet']).state_dict(),
                  'vae': AutoencoderKL.from_config(configs['vae']).state_dict()}
    if 'text_encoder' in configs:
      text_model = CLIPTextModel(CLIPTextConfig(**configs['text_encoder']))
      components['text_encoder'] = {'text_model.' + k: v for k, v in text_model.state_dict().items()}

  def unread(shape):  # our functions get shapes only, and must not read any data
    return LazyTensor(lambda: pytest.fail('a tensor was read'), tuple(shape), np.float32)
  components = {c: {k: unread(v.shape) for k, v in sd.items()} for c, sd in components.items()}

  def meta(sd, prefix):  # diffusers' converters slice: give them meta tensors
    return {prefix + k: torch.empty(v.shape, device='meta') for k, v in sd.items()}

  def check(theirs, ours):
    assert sorted(theirs) == sorted(ours)
    assert all(tuple(theirs[k].shape) == ours[k].shape for k in ours)

  unet = unet_to_compvis(components['unet'], configs['unet'])
  check(ref.convert_ldm_unet_checkpoint(meta(unet, UNET_PREFIX), configs['unet']), components['unet'])
  vae = vae_to_compvis(components['vae'], configs['vae'])
  check(ref.convert_ldm_vae_checkpoint(meta(vae, VAE_PREFIX), configs['vae']), components['vae'])
  if model == 'sdxl-base-1.0':
    return
  text = meta(text_encoder_to_compvis(components['text_encoder'], configs['text_encoder']), TEXT_PREFIX)
  check(ref.convert_open_clip_checkpoint(text_model, text, prefix=TEXT_PREFIX + 'model.')
        if model == 'sd-v2-1' else ref.convert_ldm_clip_checkpoint(text), components['text_encoder'])
  got = infer_configs(components, prediction_type='v_prediction' if model == 'sd-v2-1' else None)
  for name, config in got.items():
    if name != 'scheduler':  # (the reference has none: ours is checked on the tiny models)
      defaults = {'use_linear_projection': False, 'scaling_factor': 0.18215}
      assert {k: configs[name].get(k, defaults.get(k)) for k in config} == config, name


# ---- whole files ----------------------------------------------------------------------------------


@functools.cache
def _raw_tensors(family):
  """What a third-party single file of the family holds, as CompVis tools write it."""
  if family == 'sd1':
    unet_cfg, text = SD1_UNET, text_encoder_to_compvis(_text(SD1_TEXT), SD1_TEXT)
    text['transformer.text_model.embeddings.position_ids'] = np.arange(16, dtype=np.int64)[None]
  else:
    full = {**SD2_TEXT, 'num_hidden_layers': 3}
    unet_cfg, text = SD2_UNET, text_encoder_to_compvis(_text(full), full)
    text['model.text_projection'] = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    text['model.logit_scale'] = np.array(4.6052, np.float32)
  return {**{UNET_PREFIX + k: v for k, v in unet_to_compvis(_unet(unet_cfg), unet_cfg).items()},
          **{VAE_PREFIX + k: v for k, v in vae_to_compvis(_vae(), VAE).items()},
          **{TEXT_PREFIX + k: v for k, v in text.items()},
          'alphas_cumprod': np.linspace(1, 0.01, 1000, dtype=np.float32)}


def _raw_file(tmp_path, family):
  """A third-party single file (no configs in its metadata) and the configs of its model."""
  path = tmp_path / f'{family}.safetensors'
  save_file({k: np.ascontiguousarray(v) for k, v in _raw_tensors(family).items()}, str(path))
  prediction = 'epsilon' if family == 'sd1' else 'v_prediction'
  configs = {'unet': SD1_UNET if family == 'sd1' else SD2_UNET,
             'vae': {**VAE, 'sample_size': 512 if family == 'sd1' else 768},
             'text_encoder': SD1_TEXT if family == 'sd1' else SD2_TEXT, 'scheduler': _scheduler(prediction)}
  return path, configs, prediction


def _file_tensors(path):
  with safe_open(str(path), framework='np') as f:
    return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize('family', ['sd1', 'sd2'])
def test_read_write_read_is_lossless(tmp_path, family):
  path, configs, prediction = _raw_file(tmp_path, family)
  components, extras, metadata = read_single_file(path)
  assert stored_configs(metadata) is None
  assert isinstance(components['unet']['conv_in.weight'], LazyTensor)
  assert infer_configs(components, prediction_type=prediction) == configs
  text_extras = (['transformer.text_model.embeddings.position_ids'] if family == 'sd1' else
                 ['model.text_projection', 'model.logit_scale'])
  want = {'alphas_cumprod'} | {TEXT_PREFIX + k for k in text_extras}
  assert {k for k in extras if 'resblocks.2.' not in k} == want
  assert any('resblocks.2.' in k for k in extras) == (family == 'sd2')  # the OpenCLIP layer diffusers drops

  written = tmp_path / 'ours.safetensors'
  write_single_file(written, components, configs, extras=extras)
  original, _ = _file_tensors(path)
  ours, meta = _file_tensors(written)
  _assert_same(ours, original)  # everything the third-party file held, bit for bit
  assert stored_configs(meta) == configs == json.loads(meta[CONFIG_METADATA_KEY])

  components2, extras2, metadata2 = read_single_file(written)
  again = tmp_path / 'again.safetensors'
  write_single_file(again, components2, stored_configs(metadata2), extras=extras2, metadata=metadata2)
  _assert_same(_file_tensors(again)[0], ours)
  for name, sd in components.items():
    _assert_same(components2[name], {k: v() for k, v in sd.items()})


def test_infer_needs_prediction_type_for_sd2(tmp_path):
  path, _, _ = _raw_file(tmp_path, 'sd2')
  components, _, _ = read_single_file(path)
  with pytest.raises(ValueError, match="768-px .*'v_prediction'"):
    infer_configs(components)
  assert infer_configs(components, prediction_type='epsilon')['unet']['sample_size'] == 256


def test_write_dtype(tmp_path):
  path, configs, _ = _raw_file(tmp_path, 'sd1')
  components, extras, _ = read_single_file(path)
  half = tmp_path / 'half.safetensors'
  write_single_file(half, components, configs, extras=extras, dtype='fp16')
  tensors, _ = _file_tensors(half)
  assert tensors[UNET_PREFIX + 'out.2.weight'].dtype == np.float16
  assert tensors[TEXT_PREFIX + 'transformer.text_model.embeddings.position_ids'].dtype == np.int64
  original, _ = _file_tensors(path)
  assert np.array_equal(tensors[VAE_PREFIX + 'decoder.conv_out.weight'],
                        original[VAE_PREFIX + 'decoder.conv_out.weight'].astype(np.float16))


def test_ckpt_reads_like_safetensors(tmp_path):
  path, _, _ = _raw_file(tmp_path, 'sd2')
  tensors, _ = _file_tensors(path)
  ckpt = tmp_path / 'sd2.ckpt'
  state = {k: torch.from_numpy(v) for k, v in tensors.items()}
  state['alphas_cumprod'] = state['alphas_cumprod'].bfloat16()
  torch.save({'state_dict': state, 'global_step': 7}, ckpt)
  components, extras, metadata = read_single_file(ckpt)
  want_components, want_extras, _ = read_single_file(path)
  assert metadata == {} and sorted(extras) == sorted(want_extras)
  for name in want_components:
    _assert_same(components[name], {k: v() for k, v in want_components[name].items()})
  assert extras['alphas_cumprod']().dtype.name == 'bfloat16'
  np.testing.assert_array_equal(extras['alphas_cumprod']().astype(np.float32),
                                state['alphas_cumprod'].float().numpy())


def test_ckpt_without_torch(tmp_path, monkeypatch):
  ckpt = tmp_path / 'model.ckpt'
  ckpt.write_bytes(b'PK')
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match=f'{ckpt}.*needs PyTorch'):
    read_single_file(ckpt)


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.safetensors'):
    read_single_file(tmp_path / 'missing.safetensors')
  garbage = tmp_path / 'garbage.safetensors'
  garbage.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(ValueError, match='garbage.safetensors'):
    read_single_file(garbage)
  bad_ckpt = tmp_path / 'garbage.ckpt'
  bad_ckpt.write_bytes(np.random.default_rng(1).bytes(4096))
  with pytest.raises(ValueError, match='garbage.ckpt.*not a readable PyTorch checkpoint'):
    read_single_file(bad_ckpt)

  path, _, _ = _raw_file(tmp_path, 'sd1')
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(ValueError, match='truncated.safetensors'):
    read_single_file(truncated)

  other = tmp_path / 'lora.safetensors'
  save_file({'lora_unet_down.weight': np.zeros((2, 2), np.float32)}, str(other))
  with pytest.raises(ValueError, match='lora.safetensors: not a Stable Diffusion checkpoint'):
    read_single_file(other)

  tensors, _ = _file_tensors(path)
  unknown = tmp_path / 'unknown.safetensors'
  save_file({**tensors, UNET_PREFIX + 'bogus_block.weight': np.zeros(3, np.float32)}, str(unknown))
  with pytest.raises(KeyError, match='unknown.safetensors.*bogus_block'):
    read_single_file(unknown)

  sdxl = tmp_path / 'sdxl.safetensors'
  save_file({**tensors, 'conditioner.embedders.0.transformer.x': np.zeros(1, np.float32)}, str(sdxl))
  with pytest.raises(ValueError, match='sdxl.safetensors: an SDXL single file'):
    read_single_file(sdxl)


def test_failed_writes_leave_nothing(tmp_path):
  path, configs, _ = _raw_file(tmp_path, 'sd1')
  components, extras, _ = read_single_file(path)
  target = tmp_path / 'out' / 'model.safetensors'
  target.parent.mkdir()

  with pytest.raises(TypeError, match='complex'):
    write_single_file(target, components, configs, extras={**extras, 'bad': np.array([1 + 2j])})
  assert os.listdir(target.parent) == []

  target.write_bytes(b'previous version')
  calls = []

  def flaky():  # serves the header pass, then fails while the data is being written
    calls.append(1)
    if len(calls) > 1:
      raise OSError('disk went away')
    return np.zeros(3, np.float32)
  with pytest.raises(OSError, match='disk went away'):
    write_single_file(target, components, configs, extras={**extras, 'zzz_last': flaky})
  assert os.listdir(target.parent) == ['model.safetensors']
  assert target.read_bytes() == b'previous version'

  with pytest.raises(ValueError, match='collide'):
    write_single_file(target, components, configs, extras={UNET_PREFIX + 'out.2.bias': np.zeros(4)})
  with pytest.raises(ValueError, match='.safetensors only'):
    write_single_file(tmp_path / 'model.ckpt', components, configs)
  with pytest.raises(ValueError, match=r"no config for component\(s\) \['text_encoder', 'vae'\]"):
    write_single_file(target, components, {'unet': configs['unet']})

