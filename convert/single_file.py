"""Whole pipelines ⇄ CompVis single-file checkpoints (the A1111 / ComfyUI format), SD 1.x and 2.x.

Reading builds each component abstractly from its config (stored in files we wrote; otherwise inferred from
tensor shapes) and fills it one tensor at a time. Tensors the components do not hold (SD2's last OpenCLIP
layer, scheduler buffers, EMA weights, ...) come back as `pipe.extras` and are written again on save, so a
checkpoint read and written loses nothing. The tokenizer travels in the metadata of files we write; for other
files pass a tokenizer folder (a single-file checkpoint has none).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from convert import compvis
from convert.diffusers_format import Sharding, component_config
from esd_jax.models import build_abstract
from esd_jax.models.state_dict import load_state_dict, state_dict
from esd_jax.pipeline import StableDiffusion
from esd_jax.tokenizer import save_tokenizer

TOKENIZER_METADATA_KEY = 'esd_jax.tokenizer'


def load_single_file(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                     prediction_type: str | None = None, sharding: Sharding | None = None) -> StableDiffusion:
  """A pipeline from a single-file checkpoint.

  `tokenizer`: a CLIPTokenizer folder, needed when the file does not carry one. `prediction_type`
  ('epsilon' | 'v_prediction'): needed for SD2 files we did not write (the weights do not say it).
  """
  from transformers import CLIPTokenizer

  components, extras, metadata = compvis.read_single_file(path)
  if tokenizer is not None:
    tok = CLIPTokenizer.from_pretrained(str(tokenizer))
  elif TOKENIZER_METADATA_KEY in metadata:
    with tempfile.TemporaryDirectory() as tmp:
      for name, text in json.loads(metadata[TOKENIZER_METADATA_KEY]).items():
        Path(tmp, name).write_text(text)
      tok = CLIPTokenizer.from_pretrained(tmp)
  else:
    raise ValueError(f'{path}: a single-file checkpoint carries no tokenizer; pass a CLIPTokenizer folder (for '
                     'SD 1.x, the `tokenizer` folder of any SD 1.x diffusers pipeline).')
  missing = sorted({'unet', 'vae', 'text_encoder'} - set(components))
  if missing:
    raise ValueError(f'{path}: the checkpoint lacks {missing}; a single-file pipeline needs UNet, VAE and text '
                     'encoder.')
  configs = compvis.stored_configs(metadata, source=str(path)) or compvis.infer_configs(
      components, prediction_type=prediction_type)
  modules = {}
  for name in ('unet', 'vae', 'text_encoder'):
    module = build_abstract(configs[name], source=f'{path} ({name} config)')
    modules[name] = load_state_dict(module, components[name], source=f'{path} ({name})', sharding=sharding)
  return StableDiffusion(tokenizer=tok, scheduler_config=configs['scheduler'], extras=extras, **modules)


def save_single_file(pipe: StableDiffusion, path: str | os.PathLike, *, dtype: str | None = None) -> None:
  """Writes the pipeline as one CompVis .safetensors file (atomically), with its configs and tokenizer."""
  if pipe.is_sdxl:
    raise ValueError(f'{path}: SDXL pipelines are saved as diffusers folders; single files are SD 1.x/2.x only.')
  names = ('unet', 'vae', 'text_encoder')
  configs = {n: component_config(getattr(pipe, n)) for n in names}
  configs['scheduler'] = dict(pipe.scheduler_config)
  with tempfile.TemporaryDirectory() as tmp:
    save_tokenizer(pipe.tokenizer, tmp)
    tok = {p.name: p.read_text() for p in Path(tmp).iterdir()}
  compvis.write_single_file(path, {n: state_dict(getattr(pipe, n)) for n in names}, configs, dtype=dtype,
                            extras=pipe.extras, metadata={TOKENIZER_METADATA_KEY: json.dumps(tok)})
