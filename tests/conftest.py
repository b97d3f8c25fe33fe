import os

# Parity needs exact fp32 matmuls; keep the CPU default precision and run on CPU even where a GPU exists.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
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
