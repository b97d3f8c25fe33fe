"""A Stable Diffusion pipeline: the loaded components, as a diffusers pipeline directory holds them."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx


@dataclasses.dataclass
class StableDiffusion:
  """Components of an SD 1.x / 2.x / XL pipeline.

  `scheduler_config` is the raw `scheduler/scheduler_config.json` dict. Tokenizers are
  `transformers.CLIPTokenizer` instances (None when a single-file checkpoint was loaded without one).
  The `_2` fields are set for SDXL only. `extras` holds the tensors of a single-file checkpoint that no
  component holds (full CompVis keys → arrays), written back when the pipeline is saved as a single file.
  """

  unet: nnx.Module
  vae: nnx.Module
  text_encoder: nnx.Module
  tokenizer: Any
  scheduler_config: dict[str, Any]
  text_encoder_2: nnx.Module | None = None
  tokenizer_2: Any = None
  extras: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def is_sdxl(self) -> bool:
    return self.text_encoder_2 is not None
