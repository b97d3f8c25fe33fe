"""Format converters: diffusers folders, CompVis single files, and the plumbing they share."""

from __future__ import annotations

import os
from pathlib import Path

from esd_jax.pipeline import StableDiffusion

SINGLE_FILE_SUFFIXES = ('.safetensors', '.ckpt', '.pt', '.pth')


def load_pipeline(path_or_repo: str | os.PathLike, *, variant: str | None = None, tokenizer=None,
                  prediction_type: str | None = None, sharding=None) -> StableDiffusion:
  """A pipeline from a diffusers folder, a Hub repo id, or a CompVis single file (by what `path` is)."""
  from convert import diffusers_format, single_file

  if Path(path_or_repo).suffix in SINGLE_FILE_SUFFIXES:
    return single_file.load_single_file(path_or_repo, tokenizer=tokenizer, prediction_type=prediction_type,
                                        sharding=sharding)
  return diffusers_format.load_pipeline(path_or_repo, variant=variant, sharding=sharding)
