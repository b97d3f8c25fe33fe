"""Runs a short erasure on N emulated CPU devices and saves the trained tensors (for tests/test_train.py and
tests/test_batch.py).

    python tests/sharded_erase.py DEVICES DATA FSDP MODEL WORKDIR OUT.npz [CONCEPT]

With CONCEPT (the mesh's concept axis size), four separate models are erased at once (erase.separate_models).
"""

import os
import sys

devices, data, fsdp, model, workdir, out, *concept = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.multihost import env  # noqa: E402

os.environ.update(env(int(devices)))  # before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs.default import get_config  # noqa: E402
from esd_jax.train import run_erasure  # noqa: E402

config = get_config()
config.model, config.workdir = model, workdir
config.erase.method, config.erase.ddim_steps = 'esd-x', 4
config.train.iterations, config.train.checkpoint_every, config.train.batch_size = 4, 100, 2
config.train.learning_rate = 1e-4
config.mesh.data, config.mesh.fsdp, config.mesh.min_shard_size = int(data), int(fsdp), 2048
if concept:
  config.erase.concepts = ('a cat', 'a dog', 'a car', 'a church')
  config.erase.separate_models, config.mesh.concept = True, int(concept[0])
  config.train.batch_size = 1
result = run_erasure(config, progress=False)
assert jax.device_count() == int(devices)
split = {}
for k, v in result.trained.items():
  shards = {tuple(s.data.shape) for s in v.addressable_shards}
  split[k] = int(len(v.sharding.device_set) > 1 and shards != {v.shape})
np.savez(out, **{k: np.asarray(v) for k, v in result.trained.items()},
         **{'split/' + k: np.int32(s) for k, s in split.items()},
         **{'spec/' + k: str(v.sharding.spec) for k, v in result.trained.items()},
         # models per device: the leading (model) axis of every shard of a stacked tensor
         **{'shard_models/' + k: max(s.data.shape[0] for s in v.addressable_shards)
            for k, v in result.trained.items()})
