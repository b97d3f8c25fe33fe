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
  """The small random pipeline of esd_jax.tiny as a diffusers folder (read only), built once per test process:
  building it compiles the random initialisers (~40 s on 2 cores)."""
  from esd_jax.tiny import random_pipeline

  folder = tmp_path_factory.mktemp('tiny') / 'pipe'
  random_pipeline(folder)
  return folder
