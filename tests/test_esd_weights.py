"""ESD weight files: each format written the way the authors' code writes it is read, applied to our UNet,
and then predicts what the modified diffusers UNet predicts; what we write loads back in torch; bad inputs
fail with errors that name the file."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert.compvis import UNET_PREFIX, unet_to_compvis
from convert.esd_weights import (apply_esd_weights, read_esd_weights, write_demo_pt, write_full_pt,
                                 write_trained_safetensors)
from esd_jax.models import build_abstract
from esd_jax.models.state_dict import split_flat, state_dict
from tests.reference import load_from_torch, nchw, nhwc, numpy_state, randomize, rel_err

CONFIG = dict(block_out_channels=[32, 64], cross_attention_dim=32, norm_num_groups=8, layers_per_block=1,
              attention_head_dim=8, down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
              up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'], sample_size=8)
_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


@pytest.fixture(scope='module')
def models():
  """(base torch UNet, the same UNet with every attn2 tensor changed as ESD-x would, its config.json)."""
  base = randomize(TorchUNet(**CONFIG), seed=0, scale=0.1)
  config = json.loads(base.to_json_string())
  erased = TorchUNet.from_config(config)
  erased.load_state_dict(base.state_dict())
  g = torch.Generator().manual_seed(1)
  for name, p in erased.named_parameters():
    if 'attn2' in name:
      p.add_(torch.randn(p.shape, generator=g) * 0.2)
  return base, erased, config


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([10.0, 700.0], np.float32),
          rng.standard_normal((2, 5, 32)).astype(np.float32))


@nnx.jit
def _predict(unet, sample, timesteps, context):
  return unet(sample, timesteps, context)


def _ours(base, config):
  return load_from_torch(build_abstract(config), base)


def _reference(unet, inputs):
  sample, timesteps, context = inputs
  return unet(torch.from_numpy(nchw(sample)), torch.from_numpy(timesteps), torch.from_numpy(context)).sample


def _trained_subset(unet):
  """What esd_sd.py saves for esd-x: the parameters of every Linear/Conv2d with 'attn2' in its name."""
  return {f'{name}.{n}': p for name, m in unet.named_modules() if isinstance(m, _LAYERS) and 'attn2' in name
          for n, p in m.named_parameters()}


def _demo(unet):
  """What esd_diffusers.py saves (FineTunedModel.state_dict(), train_method 'xattn'): the module names of
  StableDiffuser.named_modules(), so with the 'unet.' prefix, each mapped to the module's state_dict()."""
  return {f'unet.{name}': m.state_dict() for name, m in unet.named_modules()
          if isinstance(m, _LAYERS) and 'attn2' in name}


def _save_released(unet, path):
  torch.save(unet.state_dict(), path)


def _save_trained(unet, path):
  save_file({k: v.contiguous() for k, v in _trained_subset(unet).items()}, str(path))


def _save_demo(unet, path):
  torch.save(_demo(unet), path)


def _save_legacy(unet, path):
  torch.save(unet.state_dict(), path, _use_new_zipfile_serialization=False)  # torch < 1.6's format


def _save_under_state_dict(unet, path):
  torch.save({'state_dict': unet.state_dict(), 'global_step': 200}, path)


def _save_compvis(unet, path, config):
  sd = unet_to_compvis(numpy_state(unet), config)
  torch.save({'state_dict': {UNET_PREFIX + k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, path)


@pytest.mark.parametrize('save,name,format,count', [
    (_save_released, 'diffusers-Thing-ESDx1-UNET.pt', 'pt', None),
    (_save_trained, 'esd-Thing-from-Thing-esdx.safetensors', 'safetensors', 'attn2'),
    (_save_demo, 'esd-thing_from_thing-xattn_1-epochs_200.pt', 'demo', 'attn2'),
    (_save_legacy, 'legacy.pt', 'pt', None),
    (_save_under_state_dict, 'checkpoint.pt', 'pt', None),
    (_save_compvis, 'compvis-thing-xattn.pt', 'compvis', None),
], ids=['released', 'trained-safetensors', 'demo', 'legacy-pickle', 'under-state_dict', 'compvis'])
def test_each_format_applied_gives_the_erased_model(models, inputs, tmp_path, save, name, format, count):
  base, erased, config = models
  path = tmp_path / name
  if save is _save_compvis:
    save(erased, path, config)
  else:
    save(erased, path)
  tensors = read_esd_weights(path)
  assert tensors.format == format and tensors.source == str(path)
  want = numpy_state(erased)
  expected = {k for k in want if count is None or count in k}
  assert set(tensors) == expected
  for key in expected:
    np.testing.assert_array_equal(np.asarray(tensors[key]), want[key])

  ours = _ours(base, config)
  before = _predict(ours, *inputs)
  assert apply_esd_weights(ours, tensors) is ours
  ref = nhwc(_reference(erased, inputs))
  err = rel_err(_predict(ours, *inputs), ref)
  print(f'{format}: relative error after applying {err:.2e}')
  assert err <= 1e-4
  assert rel_err(before, ref) > 1e-2  # the base model does differ, so the weights did the work


def test_demo_format_has_no_entry_for_absent_biases(models, tmp_path):
  """attn2.to_q/to_k/to_v have no bias in SD: the demo's module dicts then lack the key (not a None)."""
  _, erased, _ = models
  demo = _demo(erased)
  to_k = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k'
  assert list(demo[to_k]) == ['weight']
  assert list(demo[to_k.replace('to_k', 'to_out.0')]) == ['weight', 'bias']
  _save_demo(erased, tmp_path / 'demo.pt')
  tensors = read_esd_weights(tmp_path / 'demo.pt')
  key = to_k.removeprefix('unet.')
  assert f'{key}.weight' in tensors and f'{key}.bias' not in tensors


def test_written_formats_load_back_in_torch(models, tmp_path):
  base, erased, config = models
  trained = read_esd_weights(_written(erased, tmp_path / 'src.safetensors'))

  path = tmp_path / 'out.safetensors'
  write_trained_safetensors(path, trained, metadata={'method': 'esd-x', 'concept': 'Thing', 'eta': 1.0})
  unet = TorchUNet.from_config(config)
  unet.load_state_dict(base.state_dict())
  result = unet.load_state_dict(load_file(str(path)), strict=False)
  assert result.unexpected_keys == [] and set(result.missing_keys) == set(numpy_state(base)) - set(trained)
  for k, v in unet.state_dict().items():
    assert torch.equal(v, erased.state_dict()[k])
  with safe_open(str(path), 'np') as f:
    assert f.metadata() == {'method': 'esd-x', 'concept': 'Thing', 'eta': '1.0'}

  write_demo_pt(tmp_path / 'demo.pt', trained)
  demo, want = torch.load(tmp_path / 'demo.pt', weights_only=True), _demo(erased)
  assert set(demo) == set(want)
  unet = TorchUNet.from_config(config)
  unet.load_state_dict(base.state_dict())
  for module, sd in demo.items():  # as FineTunedModel.load_state_dict does: one strict load per module
    assert isinstance(sd, OrderedDict) and list(sd) == list(want[module])
    unet.get_submodule(module.removeprefix('unet.')).load_state_dict(sd)
  for k, v in unet.state_dict().items():
    assert torch.equal(v, erased.state_dict()[k])

  ours = apply_esd_weights(_ours(base, config), trained)
  write_full_pt(tmp_path / 'full.pt', ours)
  unet = TorchUNet.from_config(config)
  unet.load_state_dict(torch.load(tmp_path / 'full.pt', weights_only=True))  # strict: every key, no others
  for k, v in unet.state_dict().items():
    assert torch.equal(v, erased.state_dict()[k])


def _written(unet, path):
  _save_trained(unet, path)
  return path


@pytest.mark.parametrize('dtype,torch_dtype,np_type', [('fp16', torch.float16, np.float16),
                                                       ('bf16', torch.bfloat16, ml_dtypes.bfloat16)])
def test_reduced_precision_export(models, tmp_path, dtype, torch_dtype, np_type):
  _, erased, _ = models
  trained = read_esd_weights(_written(erased, tmp_path / 'src.safetensors'))
  write_trained_safetensors(tmp_path / 'x.safetensors', trained, dtype=dtype)
  write_demo_pt(tmp_path / 'demo.pt', trained, dtype=dtype)
  write_full_pt(tmp_path / 'full.pt', numpy_state(erased), dtype=dtype)
  demo = torch.load(tmp_path / 'demo.pt', weights_only=True)
  written = [load_file(str(tmp_path / 'x.safetensors')), torch.load(tmp_path / 'full.pt', weights_only=True),
             {f'{m.removeprefix("unet.")}.{n}': t for m, sd in demo.items() for n, t in sd.items()}]
  for tensors in written:
    for k, t in tensors.items():
      assert t.dtype == torch_dtype
      assert torch.equal(t, erased.state_dict()[k].to(torch_dtype))
  back = read_esd_weights(tmp_path / 'x.safetensors')
  assert all(v.dtype == np_type for v in back.values())
  # Applied to our fp32 UNet the values are widened back, exactly.
  ours = apply_esd_weights(_ours(erased, json.loads(erased.to_json_string())), back)
  key = next(iter(back))
  np.testing.assert_array_equal(state_dict(ours)[key], np.asarray(back[key]).astype(np.float32))


def test_read_errors_name_the_file(models, tmp_path, monkeypatch):
  _, erased, _ = models
  with pytest.raises(FileNotFoundError, match='nope.pt'):
    read_esd_weights(tmp_path / 'nope.pt')

  garbage = tmp_path / 'garbage.pt'
  garbage.write_bytes(b'\x00not a checkpoint' * 10)
  with pytest.raises(ValueError, match=r'garbage\.pt: not a checkpoint'):
    read_esd_weights(garbage)

  truncated = tmp_path / 'truncated.pt'
  _save_released(erased, truncated)
  truncated.write_bytes(truncated.read_bytes()[:-2000])
  with pytest.raises(ValueError, match='truncated.pt'):
    read_esd_weights(truncated)

  text = tmp_path / 'text_encoder.safetensors'
  save_file({'text_model.embeddings.token_embedding.weight': torch.zeros(4, 2)}, str(text))
  with pytest.raises(ValueError, match=r'text_encoder\.safetensors: 1 of 1 key\(s\) are not diffusers UNet '
                     r'keys.*text encoder or VAE'):
    read_esd_weights(text)

  pipeline = tmp_path / 'pipeline.pt'
  torch.save({'unet.conv_in.weight': torch.zeros(2), 'vae.decoder.conv_in.weight': torch.zeros(2)}, pipeline)
  with pytest.raises(ValueError, match=r'pipeline\.pt: 2 of 2 .*"unet\." prefix'):
    read_esd_weights(pipeline)

  listed = tmp_path / 'list.pt'
  torch.save([torch.zeros(2)], listed)
  with pytest.raises(ValueError, match=r'list\.pt: holds a list, not a state dict'):
    read_esd_weights(listed)

  mixed = tmp_path / 'mixed.pt'
  torch.save({'conv_in.weight': torch.zeros(2), 'step': 3}, mixed)
  with pytest.raises(ValueError, match=r'mixed\.pt: not an ESD weights file.*neither: step'):
    read_esd_weights(mixed)

  empty = tmp_path / 'empty.safetensors'
  save_file({}, str(empty))
  with pytest.raises(ValueError, match='empty.safetensors: holds no tensors'):
    read_esd_weights(empty)

  released = tmp_path / 'released.pt'
  _save_released(erased, released)
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(ImportError, match=r'released\.pt: Reading a pickled PyTorch checkpoint needs PyTorch'):
    read_esd_weights(released)
  with pytest.raises(ImportError, match=r'x\.pt: Writing the demo format needs PyTorch'):
    write_demo_pt(tmp_path / 'x.pt', {'conv_in.weight': np.zeros(2)})


def test_apply_errors_leave_the_unet_untouched(models, tmp_path):
  base, erased, config = models
  ours = _ours(base, config)
  before = {k: np.asarray(v) for k, v in state_dict(ours).items()}
  trained = read_esd_weights(_written(erased, tmp_path / 'w.safetensors'))

  bigger = {**trained, 'down_blocks.2.resnets.0.conv1.weight': np.zeros((3, 3, 3, 3), np.float32)}
  with pytest.raises(KeyError, match=r'w\.safetensors: 1 tensor\(s\) have no counterpart.*down_blocks\.2'):
    apply_esd_weights(ours, bigger, source=trained.source)
  key = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'
  wrong = {**trained, key: np.zeros((32, 48), np.float32)}
  with pytest.raises(ValueError, match=r'ESD weights: 1 tensor\(s\) do not fit .*to_k\.weight \(32, 48\)'):
    apply_esd_weights(ours, wrong)
  after = state_dict(ours)
  assert all(np.array_equal(before[k], after[k]) for k in before)

  with pytest.raises(ValueError, match='no tensors to apply'):
    apply_esd_weights(ours, {})
  with pytest.raises(ValueError, match=r'built abstractly\): load the base model first'):
    apply_esd_weights(build_abstract(config), trained)
  # A full state dict can fill an abstract UNet.
  full = read_esd_weights(_released(erased, tmp_path / 'full.pt'))
  filled = apply_esd_weights(build_abstract(config), full)
  assert isinstance(split_flat(filled)[1][key], jax.Array)


def test_apply_keeps_each_parameters_placement(models, tmp_path):
  """New values are placed like the ones they replace, so jitted callers see the same signature."""
  base, erased, config = models
  trained = read_esd_weights(_written(erased, tmp_path / 'w.safetensors'))
  ours = apply_esd_weights(_ours(base, config), trained)
  assert not any(v.committed for v in split_flat(ours)[1].values())
  ours = _ours(base, config)
  nnx.update(ours, jax.device_put(nnx.state(ours), jax.devices()[0]))
  ours = apply_esd_weights(ours, trained)
  assert all(v.committed for v in split_flat(ours)[1].values())


def _released(unet, path):
  _save_released(unet, path)
  return path


def test_write_errors(tmp_path):
  with pytest.raises(ValueError, match=r'x\.pt: this format is a \.safetensors file'):
    write_trained_safetensors(tmp_path / 'x.pt', {'conv_in.weight': np.zeros(2)})
  with pytest.raises(ValueError, match=r'x\.safetensors: this format is a pickled PyTorch file'):
    write_full_pt(tmp_path / 'x.safetensors', {'conv_in.weight': np.zeros(2)})
  with pytest.raises(ValueError, match=r'y\.safetensors: 1 of 2 key\(s\) are not diffusers UNet keys: '
                     r'encoder\.conv_in\.weight'):
    write_trained_safetensors(tmp_path / 'y.safetensors', {'conv_in.weight': np.zeros(2),
                                                           'encoder.conv_in.weight': jnp.zeros(2)})
  with pytest.raises(ValueError, match=r'demo\.pt: the demo format stores whole Linear/Conv2d modules.*'
                     r'attn2\.scale'):
    write_demo_pt(tmp_path / 'demo.pt', {'down_blocks.0.attn2.scale': np.zeros(2)})
  assert not list(tmp_path.iterdir())  # nothing half-written
