"""CLIP text encoders against transformers: numerics on small random models, structure at full size."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel as TorchCLIP
from transformers import CLIPTextModelWithProjection as TorchCLIPProj

from esd_jax.models import build_abstract
from esd_jax.models.clip import CLIPTextModelWithProjection, canonical_keys
from esd_jax.models.config import ModelConfigError
from esd_jax.models.state_dict import load_state_dict, param_shapes
from tests.reference import numpy_state, randomize, rel_err

REFERENCE = Path(__file__).parent.parent / 'esd_jax' / 'models' / 'reference_configs'
TORCH_CLASSES = {'CLIPTextModel': TorchCLIP, 'CLIPTextModelWithProjection': TorchCLIPProj}
VOCAB, LENGTH = 64, 12
BOS, EOS = VOCAB - 2, VOCAB - 1  # CLIP's vocabulary ends with <|startoftext|>, <|endoftext|>
ADDED = VOCAB  # a token added after EOS (e.g. textual inversion); the embedding tables hold VOCAB + 1

SMALL = {
    # Pre-#24773 config (eos_token_id 2): pooled at the largest id; SD 1.x tokenizer pads with EOS.
    'legacy-eos-quick-gelu': dict(architectures=['CLIPTextModel'], hidden_size=32, intermediate_size=64,
                                  num_attention_heads=4, num_hidden_layers=2, hidden_act='quick_gelu',
                                  eos_token_id=2, bos_token_id=0, pad=EOS),
    # eos_token_id path; SD 2.x tokenizer pads with 0. A 100-wide MLP and 3 heads of 16.
    'eos-id-gelu': dict(architectures=['CLIPTextModel'], hidden_size=48, intermediate_size=100,
                        num_attention_heads=3, num_hidden_layers=3, hidden_act='gelu', layer_norm_eps=1e-6,
                        eos_token_id=EOS, bos_token_id=BOS, pad=0),
    'projection-gelu': dict(architectures=['CLIPTextModelWithProjection'], hidden_size=40,
                            intermediate_size=80, num_attention_heads=5, num_hidden_layers=4,
                            hidden_act='gelu', projection_dim=24, eos_token_id=EOS, bos_token_id=BOS, pad=EOS),
    'projection-legacy-eos': dict(architectures=['CLIPTextModelWithProjection'], hidden_size=32,
                                  intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
                                  hidden_act='quick_gelu', projection_dim=32, eos_token_id=2, bos_token_id=0,
                                  pad=EOS),
}


def _input_ids(pad: int, lengths=(3, 7, LENGTH - 2, 1)) -> np.ndarray:
  """Tokenizer-shaped prompts: BOS, words, EOS, then padding to LENGTH."""
  rng = np.random.default_rng(0)
  ids = np.full((len(lengths), LENGTH), pad, np.int32)
  for row, n in enumerate(lengths):
    ids[row, :n + 2] = [BOS, *rng.integers(1, BOS, n), EOS]
  return ids


def _pair(name: str):
  spec = dict(SMALL[name])
  pad = spec.pop('pad')
  config = CLIPTextConfig(vocab_size=VOCAB + 1, max_position_embeddings=LENGTH, pad_token_id=pad, **spec)
  ref = randomize(TORCH_CLASSES[spec['architectures'][0]](config).eval())
  # The config exactly as transformers 5 writes it to config.json; built abstract and filled from ref.
  ours = build_abstract(json.loads(config.to_json_string()))
  load_state_dict(ours, canonical_keys(numpy_state(ref)), source=name)
  return ours, ref, _input_ids(pad)


@functools.partial(nnx.jit, static_argnames='dtype')
def _run(model, ids, dtype=jnp.float32):
  return model(ids, dtype=dtype)


@pytest.mark.parity
@pytest.mark.parametrize('name', list(SMALL))
def test_text_encoder_parity(name):
  ours, ref, ids = _pair(name)
  want = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
  got = _run(ours, ids)
  assert len(got.hidden_states) == len(want.hidden_states) == ours.config['num_hidden_layers'] + 1
  errors = {'last_hidden_state': rel_err(got.last_hidden_state, want.last_hidden_state),
            'penultimate': rel_err(got.hidden_states[-2], want.hidden_states[-2]),
            'hidden_states': max(map(rel_err, got.hidden_states, want.hidden_states)),
            'pooled': rel_err(got.pooler_output, want.pooler_output if hasattr(want, 'pooler_output')
                              else ref.text_model(torch.from_numpy(ids).long()).pooler_output)}
  if isinstance(ours, CLIPTextModelWithProjection):
    errors['text_embeds'] = rel_err(got.text_embeds, want.text_embeds)
  else:
    assert got.text_embeds is None
  print(name, errors)
  assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parity
def test_added_token_pools_at_eos():
  """With an added token (id above EOS) in the prompt only the eos_token_id rule still finds EOS."""
  ours, ref, ids = _pair('eos-id-gelu')
  ids[:, 1] = ADDED
  assert (ids.argmax(-1) != (ids == EOS).argmax(-1)).all()
  got = _run(ours, ids)
  assert rel_err(got.pooler_output, ref(torch.from_numpy(ids).long()).pooler_output) <= 1e-4


def test_bf16_compute():
  ours, _, ids = _pair('projection-gelu')
  full, half = _run(ours, ids), _run(ours, ids, jnp.bfloat16)
  assert half.last_hidden_state.dtype == half.text_embeds.dtype == jnp.bfloat16
  assert rel_err(half.last_hidden_state, full.last_hidden_state) < 3e-2


@pytest.mark.parametrize('legacy', [False, True])
def test_checkpoint_key_spellings(tmp_path, legacy):
  """transformers 5 saves a fresh CLIPTextModel without `text_model.`; older files carry the prefix and the
  position_ids buffer. Both load strictly after canonical_keys."""
  ours, ref, ids = _pair('eos-id-gelu')
  ref.save_pretrained(tmp_path)
  tensors = load_file(tmp_path / 'model.safetensors')
  assert not any(k.startswith('text_model.') for k in tensors)
  if legacy:
    tensors = {'text_model.' + k: v for k, v in tensors.items()}
    tensors['text_model.embeddings.position_ids'] = np.arange(LENGTH)[None]
    save_file(tensors, tmp_path / 'model.safetensors')
    tensors = load_file(tmp_path / 'model.safetensors')
  config = json.loads((tmp_path / 'config.json').read_text())
  loaded = build_abstract(config, source='config.json')
  load_state_dict(loaded, canonical_keys(tensors), source='model.safetensors')
  assert param_shapes(loaded) == param_shapes(ours)
  want = ref(torch.from_numpy(ids).long()).last_hidden_state
  assert rel_err(_run(loaded, ids).last_hidden_state, want) <= 1e-4


@pytest.mark.parametrize('path,params', [
    ('sd-v1-4/text_encoder', 123_060_480),
    ('sd-v2-1/text_encoder', 340_387_840),
    ('sdxl-base-1.0/text_encoder', 123_060_480),
    ('sdxl-base-1.0/text_encoder_2', 694_659_840),
])
def test_full_size_structure(path, params):
  config = json.loads((REFERENCE / path / 'config.json').read_text())
  ours = build_abstract(config)
  with torch.device('meta'):
    ref = TORCH_CLASSES[config['architectures'][0]](CLIPTextConfig.from_dict(config))
  shapes = param_shapes(ours)
  assert shapes == canonical_keys({k: tuple(v.shape) for k, v in ref.named_parameters()})
  assert sum(int(np.prod(s)) for s in shapes.values()) == params


@pytest.mark.parametrize('change,field', [
    ({'use_cache': True}, 'use_cache'),
    ({'hidden_act': 'relu'}, 'hidden_act'),
    ({'eos_token_id': [2, 49407]}, 'eos_token_id'),
    ({'num_attention_heads': 5}, 'hidden_size'),
    ({'architectures': ['CLIPTextModelWithProjection'], 'projection_dim': None}, 'projection_dim'),
])
def test_bad_config(change, field):
  config = {'architectures': ['CLIPTextModel'], 'hidden_size': 32, 'num_attention_heads': 4, **change}
  with pytest.raises(ModelConfigError, match=field):
    build_abstract(config, source='text_encoder/config.json')
