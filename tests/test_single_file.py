"""Whole pipelines through CompVis single files."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from esd_jax.loading import load_pipeline
from convert.single_file import load_single_file, save_single_file
from esd_jax.models.state_dict import state_dict
from tests import torch_pipelines


@pytest.mark.parametrize('sd2', [False, True], ids=['sd1', 'sd2'])
def test_folder_to_single_file_and_back_is_bit_exact(tmp_path, sd2):
  torch_pipelines.make_sd(tmp_path, sd2=sd2)
  pipe = load_pipeline(tmp_path / 'pipe')
  save_single_file(pipe, tmp_path / 'a.safetensors')
  again = load_pipeline(tmp_path / 'a.safetensors')
  for name in ('unet', 'vae', 'text_encoder'):
    want, got = state_dict(getattr(pipe, name)), state_dict(getattr(again, name))
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want), name
    assert getattr(again, name).config == getattr(pipe, name).config
  assert again.scheduler_config == pipe.scheduler_config
  assert again.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
  save_single_file(again, tmp_path / 'b.safetensors')
  a, b = load_file(tmp_path / 'a.safetensors'), load_file(tmp_path / 'b.safetensors')
  assert a.keys() == b.keys() and any(k.startswith('model.diffusion_model.') for k in a)
  assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_extras_survive_and_foreign_files_need_a_tokenizer(tmp_path):
  torch_pipelines.make_sd(tmp_path)
  pipe = load_pipeline(tmp_path / 'pipe')
  pipe.extras = {'alphas_cumprod': np.linspace(1, 0, 1000).astype(np.float32)}
  save_single_file(pipe, tmp_path / 'a.safetensors', dtype='fp16')
  assert load_file(tmp_path / 'a.safetensors')['alphas_cumprod'].dtype == np.float16
  again = load_single_file(tmp_path / 'a.safetensors')
  assert set(again.extras) == {'alphas_cumprod'}
  # A file that we did not write: no stored configs, no tokenizer.
  tensors = load_file(tmp_path / 'a.safetensors')
  from safetensors.numpy import save_file
  save_file(tensors, tmp_path / 'foreign.safetensors')
  with pytest.raises(ValueError, match='carries no tokenizer'):
    load_single_file(tmp_path / 'foreign.safetensors')
