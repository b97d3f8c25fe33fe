"""The default experiment. Every field is documented here; other configs start from this one.

Until the shapes-world model ships, the default model is a small random pipeline ("tiny-random").
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # A diffusers pipeline folder, a Hub repo id, a single-file CompVis checkpoint (.safetensors / .ckpt),
  # or "tiny-random" (a small random SD 1.x-structured pipeline, built on first use under workdir).
  config.model = 'tiny-random'
  config.variant = ''  # weights variant of a diffusers folder, e.g. "fp16"; empty for the default files
  config.tokenizer = ''  # single files only: a CLIPTokenizer folder, when the file carries none
  config.prediction_type = ''  # single files only: 'epsilon' | 'v_prediction' for SD2 files we did not write
  config.workdir = 'outputs/default'  # every output of a run goes here; re-running resumes

  # What to erase and how (ESD_SPEC §1-3). Defaults: the paper's.
  config.erase = ml_collections.ConfigDict()
  config.erase.concepts = ('a photo of a cat',)  # one is drawn per iteration
  config.erase.erase_from = ''  # erase a concept only from this prompt; '' for none; or one per concept
  config.erase.method = 'esd-x'  # esd-x | esd-u | esd-x-strict | esd-self | esd-all | notime | xlayer |
  #                                selflayer (CompVis aliases xattn, noxattn, selfattn, full) | patterns
  config.erase.patterns = ()  # regexes over diffusers parameter names, for method 'patterns'
  config.erase.convention = 'paper'  # paper | diffusers-v1 | diffusers-v2 (how x_t is sampled, ESD_SPEC §2)
  config.erase.negative_guidance = 1.0  # η, in the paper's convention
  config.erase.guidance = 3.0  # guidance of the sampler that produces x_t
  config.erase.ddim_steps = 50
  config.erase.sampler = 'ddim'  # diffusers-v2 only: ddim | pndm
  config.erase.resolution = 0  # image size trained at; 0: the model's native size

  config.train = ml_collections.ConfigDict()
  config.train.iterations = 1000
  config.train.learning_rate = 1e-5
  config.train.batch_size = 1
  config.train.seed = 0
  config.train.compute_dtype = 'float32'  # float32 | bfloat16 (parameters and Adam state stay float32)
  config.train.checkpoint_every = 100

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.keep = 2  # checkpoints kept in workdir/checkpoints

  # Device mesh: `data` splits the batch, `fsdp` splits parameters; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.min_shard_size = 2 ** 18  # tensors smaller than this (elements) are replicated
  config.mesh.distributed = False  # multi-host (TPU pod): call jax.distributed.initialize() first

  # The erased model: `erase` writes export.formats to workdir/erased; `export` writes them to workdir/export
  # for any ESD weights file (export.weights), `compare` renders original vs erased with the generate settings.
  config.export = ml_collections.ConfigDict()
  config.export.formats = ('trained',)  # trained | unet | diffusers | single_file (see convert/export.py)
  config.export.dtype = 'fp32'  # fp32 | fp16 | bf16
  config.export.weights = ''  # ESD weights (ours or the authors' .pt/.safetensors); '' = workdir's erasure

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
