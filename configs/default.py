"""The default experiment: the small built-in pipeline (random weights until the shapes-world model ships)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # A diffusers pipeline folder, a Hub repo id, a single-file CompVis checkpoint (.safetensors / .ckpt),
  # or "tiny-random" (a small random SD 1.x-structured pipeline, built on first use under workdir).
  config.model = 'tiny-random'
  config.variant = ''  # weights variant of a diffusers folder, e.g. "fp16"; empty for the default files
  config.workdir = 'outputs/default'  # every output of a run goes here

  config.generate = ml_collections.ConfigDict()
  config.generate.prompts = ('a photo of a cat', 'a painting of a church', 'a photo of a car')
  config.generate.negative_prompt = ''
  config.generate.seeds = (0, 1, 2, 3)
  config.generate.guidance_scale = 7.5
  config.generate.steps = 50
  config.generate.scheduler = 'ddim'  # ddim | pndm | config (the pipeline's own scheduler class)
  config.generate.eta = 0.0
  config.generate.height = 0  # 0: the model's native size
  config.generate.width = 0
  config.generate.dtype = 'float32'  # compute dtype: float32 | bfloat16 (parameters stay float32)
  return config
