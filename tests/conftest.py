import os

# Parity needs exact fp32 matmuls; keep the CPU default precision and run on CPU even where a GPU exists.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
import torch  # noqa: E402

# Two pytest workers share two cores: more threads per process only contend.
torch.set_num_threads(1)
