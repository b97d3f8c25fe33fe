"""Every export format loads in its consumer and computes what our erased UNet computes."""

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.numpy import load_file

from convert.compvis import UNET_PREFIX, unet_to_compvis
from convert.diffusers_format import component_config
from convert.erased import FORMATS, TENSORS_GIVEN_KEY, TENSORS_KEPT_KEY, erased_pipeline, write_erased
from convert.esd_weights import read_esd_weights, write_full_pt
from convert.single_file import load_single_file
from esd_jax.files import SafetensorsReader
from esd_jax.loading import load_pipeline
from esd_jax.methods import trained_keys
from esd_jax.models.state_dict import state_dict
from tests import torch_pipelines
from tests.reference import nchw, nhwc, rel_err


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('export')
  torch_pipelines.make_sd(tmp)
  pipe = load_pipeline(tmp / 'pipe')
  base = state_dict(pipe.unet)
  rng = np.random.default_rng(0)
  # Stand-in for an erasure: the esd-x tensors moved well away from the base.
  trained = {k: np.asarray(base[k]) + 0.05 * rng.standard_normal(base[k].shape).astype(np.float32)
             for k in trained_keys(base, 'esd-x')}
  paths = write_erased(pipe, trained, tmp / 'out', FORMATS, metadata={'concept': 'a cat'})
  return tmp, pipe, erased_pipeline(pipe, trained), trained, paths


def _inputs():
  rng = np.random.default_rng(1)
  return (rng.standard_normal((2, 16, 16, 4)).astype(np.float32), np.array([10, 700]),
          rng.standard_normal((2, 16, 32)).astype(np.float32))


def _ours(erased):
  x, t, ctx = _inputs()
  return np.asarray(erased.unet(x, t, ctx))


def _theirs(unet):
  x, t, ctx = _inputs()
  return nhwc(unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample)


def test_erasure_changes_the_unet(exported):
  _, pipe, erased, _, _ = exported
  x, t, ctx = _inputs()
  assert rel_err(np.asarray(pipe.unet(x, t, ctx)), _ours(erased)) > 1e-2


def test_diffusers_pipeline_and_unet_folders(exported):
  _, _, erased, _, paths = exported
  want = _ours(erased)
  pipe = StableDiffusionPipeline.from_pretrained(paths['diffusers'])
  assert rel_err(_theirs(pipe.unet), want) <= 1e-4
  assert rel_err(_theirs(UNet2DConditionModel.from_pretrained(paths['unet'])), want) <= 1e-4


def test_trained_subset_loads_non_strict(exported):
  tmp, _, erased, trained, paths = exported
  unet = UNet2DConditionModel.from_pretrained(tmp / 'pipe' / 'unet')
  result = unet.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(paths['trained']).items()},
                                strict=False)
  assert not result.unexpected_keys and len(result.missing_keys) == len(unet.state_dict()) - len(trained)
  assert rel_err(_theirs(unet), _ours(erased)) <= 1e-4
  with SafetensorsReader(paths['trained']) as reader:  # ESD-x: every given tensor was trained, all kept
    assert reader.metadata[TENSORS_GIVEN_KEY] == reader.metadata[TENSORS_KEPT_KEY] == str(len(trained))


def _save_full_unet(tensors, path, layout, pipe):
  """The whole UNet as the authors' code saves it: the released `torch.save(unet.state_dict())` (diffusers
  keys), or the paper's CompVis code (`{'state_dict': ...}` under `model.diffusion_model.`)."""
  if layout == 'released':
    write_full_pt(path, tensors)
  else:
    compvis = unet_to_compvis(tensors, component_config(pipe.unet))
    torch.save({'state_dict': {UNET_PREFIX + k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in compvis.items()}}, path)


@pytest.mark.parametrize('layout', ['released', 'compvis'])
def test_trained_file_of_a_full_unet_keeps_only_what_differs_from_the_base(exported, layout):
  tmp, pipe, _, _, _ = exported
  base = {k: np.array(v) for k, v in state_dict(pipe.unet).items()}
  changed = sorted(k for k in base if k.endswith('attn2.to_k.weight'))
  assert changed and len(changed) < len(base)
  full = {k: v + np.float32(0.05) if k in changed else v for k, v in base.items()}
  path = tmp / f'diffusers-Thing-ESDx1-UNET-{layout}.pt'
  _save_full_unet(full, path, layout, pipe)
  weights = read_esd_weights(path)
  assert set(weights) == set(base)

  paths = write_erased(pipe, weights, tmp / f'full-{layout}', ('trained',))
  with SafetensorsReader(paths['trained']) as reader:
    assert sorted(reader) == changed
    assert reader.metadata[TENSORS_GIVEN_KEY] == str(len(base))
    assert reader.metadata[TENSORS_KEPT_KEY] == str(len(changed))
    for key in changed:
      np.testing.assert_array_equal(reader[key](), full[key])

  same = tmp / f'base-{layout}.pt'
  _save_full_unet(base, same, layout, pipe)
  with pytest.raises(ValueError, match=re.escape(str(same)) + r': all \d+ tensor\(s\) equal the base model'):
    write_erased(pipe, read_esd_weights(same), tmp / f'same-{layout}', ('diffusers', 'trained'))
  assert not (tmp / f'same-{layout}').exists()  # refused before anything was written


def test_single_file_round_trip_and_diffusers_single_file_loader(exported):
  tmp, _, erased, _, paths = exported
  again = load_single_file(paths['single_file'])
  want, got = state_dict(erased.unet), state_dict(again.unet)
  assert all(np.array_equal(want[k], got[k]) for k in want)
  # diffusers' own loader, offline: configs from the local pipeline folder, weights mapped by its converters.
  pipe = StableDiffusionPipeline.from_single_file(str(paths['single_file']), config=str(tmp / 'pipe'),
                                                  local_files_only=True)
  assert rel_err(_theirs(pipe.unet), _ours(erased)) <= 1e-4


def test_unknown_format(exported):
  tmp, pipe, _, trained, _ = exported
  with pytest.raises(ValueError, match=r"Unknown export format\(s\) \['onnx'\]"):
    write_erased(pipe, trained, tmp / 'x', ['onnx'])
