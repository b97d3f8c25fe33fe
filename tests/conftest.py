import atexit
import os
import shutil
import tempfile

# Parity needs exact fp32 matmuls; keep the CPU default precision and run on CPU even where a GPU exists.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

# One persistent XLA compilation cache for the whole run, shared by the pytest workers and the subprocesses the
# tests start (they inherit the environment): many tests compile the same tiny-model steps, and a cache hit loads the
# executable XLA already built instead of compiling it again (tens of seconds each on 2 cores). The controller makes
# it before the workers start and removes it at exit, so every run starts cold and no run sees another's entries.
if 'PYTEST_XDIST_WORKER' not in os.environ and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='esd-jax-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import torch  # noqa: E402

# Two pytest workers share two cores: more threads per process only contend.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def model(tmp_path_factory):
  """The small pipeline of esd_jax.tiny (same configs, tokenizer and scheduler) as a diffusers folder (read only),
  built once per test process. Its random weights come from the components' torch twins, saved by
  StableDiffusionPipeline.save_pretrained: seconds, against ~30 s for our initialisers' kernels to compile on 2
  cores (esd_jax.tiny.random_pipeline, which the CLI test of `tiny-random` runs)."""
  from diffusers import DDIMScheduler, StableDiffusionPipeline
  from transformers import CLIPTokenizer

  from esd_jax import tiny
  from esd_jax.models import clip
  from esd_jax.tokenizer import write_clip_tokenizer
  from tests.reference import torch_twin

  folder = tmp_path_factory.mktemp('tiny') / 'pipe'
  write_clip_tokenizer(folder.parent / 'tokenizer', tiny.WORDS, model_max_length=16)
  tokenizer = CLIPTokenizer.from_pretrained(str(folder.parent / 'tokenizer'))
  torch.manual_seed(0)
  pipe = StableDiffusionPipeline(
      vae=torch_twin(tiny.VAE), unet=torch_twin(tiny.UNET),
      text_encoder=torch_twin(clip.for_vocabulary(tiny.TEXT_ENCODER, len(tokenizer))), tokenizer=tokenizer,
      scheduler=DDIMScheduler.from_config({k: v for k, v in tiny.SCHEDULER.items() if not k.startswith('_')}),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(str(folder))
  return folder


def pytest_collection_modifyitems(items):
  # The multi-process and parity tests are the suite's longest (minutes each against seconds): run them first, so
  # that the two xdist workers do not end with one of them alone on one worker while the other idles. Stable sort:
  # each worker collects the same order, as xdist requires.
  rank = lambda item: 0 if item.get_closest_marker('multihost') else 1 if item.get_closest_marker('parity') else 2
  items.sort(key=rank)
