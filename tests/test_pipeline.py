"""Pipeline folders and text-to-image against diffusers' StableDiffusion(XL)Pipeline on the same weights."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.numpy import load_file

import convert.diffusers_format as fmt
from esd_jax.generate import text_to_image
from esd_jax.loading import ModelNotFound, model_path
from esd_jax.models import clip
from esd_jax.models.config import ModelConfigError
from esd_jax.models.state_dict import state_dict
from tests import torch_pipelines
from tests.reference import nchw

PROMPTS = ['a red circle', 'a photo of a cat']


def _sample_both(pipe_ref, pipe, steps=4, guidance=7.5, negative=''):
  latents = np.random.default_rng(0).standard_normal((len(PROMPTS), 16, 16, 4)).astype(np.float32)
  kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type='np',
                latents=torch.from_numpy(nchw(latents)))
  ref = pipe_ref(PROMPTS, negative_prompt=[negative] * len(PROMPTS) if negative is not None else None,
                 **kwargs).images
  ours, _ = text_to_image(pipe, PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                          negative_prompt=negative)
  return np.asarray(ours), ref


@pytest.mark.parity
@pytest.mark.parametrize('sd2', [False, True], ids=['sd1', 'sd2'])
def test_text_to_image_matches_diffusers(tmp_path, sd2):
  ref_pipe = torch_pipelines.make_sd(tmp_path, sd2=sd2)
  ours, ref = _sample_both(ref_pipe, fmt.load_folder(tmp_path / 'pipe'))
  assert ours.shape == ref.shape == (2, 32, 32, 3)
  assert np.abs(ours - ref).max() <= 1 / 255
  assert ref.std() > 0.01  # the comparison is not between two blank images


@pytest.mark.parity
def test_sdxl_text_to_image_matches_diffusers(tmp_path):
  ref_pipe = torch_pipelines.make_sdxl(tmp_path)
  ours, ref = _sample_both(ref_pipe, fmt.load_folder(tmp_path / 'pipe'), negative=None)
  assert np.abs(ours - ref).max() <= 1 / 255


def _safetensors_in(folder):
  """Tensors per component; text encoders' keys in their canonical (`text_model.`-prefixed) spelling."""
  return {p.relative_to(folder).parent.as_posix(): clip.canonical_keys(load_file(p))
          for p in folder.rglob('*.safetensors')}


@pytest.mark.parametrize('sdxl', [False, True], ids=['sd', 'sdxl'])
def test_pipeline_folder_round_trip_is_bit_exact_and_loads_in_diffusers(tmp_path, sdxl):
  ref_pipe = torch_pipelines.make_sdxl(tmp_path) if sdxl else torch_pipelines.make_sd(tmp_path)
  fmt.save_pipeline(fmt.load_folder(tmp_path / 'pipe'), tmp_path / 'out')
  src, out = _safetensors_in(tmp_path / 'pipe'), _safetensors_in(tmp_path / 'out')
  assert src.keys() == out.keys() and len(src) == (4 if sdxl else 3)
  for component, tensors in src.items():
    assert tensors.keys() == out[component].keys(), component
    for key, value in tensors.items():
      assert value.dtype == out[component][key].dtype and np.array_equal(value, out[component][key]), key
  cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
  reloaded = cls.from_pretrained(tmp_path / 'out')
  for name in ('unet', 'vae', 'text_encoder') + (('text_encoder_2',) if sdxl else ()):
    want, got = getattr(ref_pipe, name).state_dict(), getattr(reloaded, name).state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), name
  assert reloaded.tokenizer.get_vocab() == ref_pipe.tokenizer.get_vocab()


def test_sharded_fp16_variant_component(tmp_path):
  ref = torch_pipelines.make_sd(tmp_path).unet.half()
  ref.save_pretrained(tmp_path / 'unet', variant='fp16', max_shard_size='100KB')
  assert len(list((tmp_path / 'unet').glob('*.safetensors'))) > 1
  ours = fmt.load_component(tmp_path / 'unet', variant='fp16')
  want = {k: v.float().numpy() for k, v in ref.state_dict().items()}
  got = state_dict(ours)
  assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  with pytest.raises(FileNotFoundError, match='pass the variant'):
    fmt.load_component(tmp_path / 'unet')


@pytest.fixture()
def pipe_dir(tmp_path):
  torch_pipelines.make_sd(tmp_path)
  return tmp_path / 'pipe'


def test_missing_component(pipe_dir):
  shutil.rmtree(pipe_dir / 'vae')
  with pytest.raises(FileNotFoundError, match=r'vae/config.json: not found'):
    fmt.load_folder(pipe_dir)


def test_truncated_weights(pipe_dir):
  path = pipe_dir / 'unet' / 'diffusion_pytorch_model.safetensors'
  path.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(ValueError, match=r'unet/diffusion_pytorch_model.safetensors: not a readable safetensors'):
    fmt.load_folder(pipe_dir)


def _edit_config(path, **changes):
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_wrong_shape(pipe_dir):
  _edit_config(pipe_dir / 'unet' / 'config.json', cross_attention_dim=40)
  with pytest.raises(ValueError, match=r"unet: tensor '.*attn2.to_k.weight' has shape \(32, 32\).*expects \(32, 40\)"):
    fmt.load_folder(pipe_dir)


def test_unknown_config_field(pipe_dir):
  _edit_config(pipe_dir / 'vae' / 'config.json', shiny_new_option=True)
  with pytest.raises(ModelConfigError, match=r"vae/config.json: AutoencoderKL has config field\(s\) \['shiny_new_option'\]"):
    fmt.load_folder(pipe_dir)


def test_not_a_pipeline_folder(tmp_path):
  with pytest.raises(ModelNotFound, match='no such pipeline folder or checkpoint file'):
    model_path(str(tmp_path / 'nowhere'), tmp_path)
  tmp_path.joinpath('empty').mkdir()
  with pytest.raises(ModelNotFound, match='without model_index.json'):
    model_path(str(tmp_path / 'empty'), tmp_path)
  with pytest.raises(FileNotFoundError, match='model_index.json: not found'):
    fmt.load_folder(tmp_path / 'empty')
  tmp_path.joinpath('weights.bin').write_bytes(b'x')
  with pytest.raises(ModelNotFound, match='is a file but not a single-file checkpoint'):
    model_path(str(tmp_path / 'weights.bin'), tmp_path)


def test_failed_save_leaves_no_partial_output(pipe_dir, monkeypatch):
  pipe = fmt.load_folder(pipe_dir)
  calls = []

  def failing(path, tensors, **kwargs):
    calls.append(path)
    if len(calls) == 2:
      raise OSError('disk full')
    return real(path, tensors, **kwargs)

  real = fmt.write_safetensors
  monkeypatch.setattr(fmt, 'write_safetensors', failing)
  out = pipe_dir.parent / 'out'
  with pytest.raises(OSError, match='disk full'):
    fmt.save_pipeline(pipe, out)
  assert not out.exists()
  assert sorted(p.name for p in pipe_dir.parent.iterdir()) == ['pipe', 'tok']
