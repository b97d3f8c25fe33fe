"""Several processes (the hosts of a TPU pod slice, or local processes) running one program: multi-controller JAX.

Every process runs the same command on the same config; `main.py` calls `initialize` first when
`mesh.distributed` is set. The rules the rest of esd-jax follows: a value a process cannot address is gathered
(`gather`, a collective every process calls) or computed on the devices first; files are written by process 0
(`is_main`) while the others wait at a `barrier` (orbax checkpoints are written by all, cooperatively); logs and
progress bars come from process 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from esd_jax.pipeline import StableDiffusion


def initialize(mesh: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize with the config's coordinator, process count and id; empty / 0 / -1 leave each to
  JAX's cluster detection (Cloud TPU, SLURM, Open MPI) or its JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID variables. A process that stops heartbeating for mesh.heartbeat_timeout_s makes the others fail
  instead of waiting."""
  jax.distributed.initialize(
      coordinator_address=mesh.coordinator_address or None,
      num_processes=mesh.num_processes or None,
      process_id=None if mesh.process_id < 0 else mesh.process_id,
      initialization_timeout=mesh.initialization_timeout_s,
      heartbeat_timeout_seconds=mesh.heartbeat_timeout_s)


def is_main() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather(tree):
  """Every array of `tree` whole on this process: with one process the tree as it is (on its devices); with
  several, each array as numpy, those that span processes gathered (a collective every process must call, each
  contributing the shards it holds)."""
  if jax.process_count() == 1:
    return tree

  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree.map(one, tree)


def put(value, sharding):
  """jax.device_put(value, sharding) for a host value that every process holds alike (a numpy array, a scalar):
  each process places only the shards its own devices hold. jax.device_put would first all-gather the value to
  check that the processes agree: a collective per array (per parameter, when loading a model; per step, for
  the step's host inputs)."""
  if sharding is None or isinstance(value, jax.Array) or jax.process_count() == 1:
    return jax.device_put(value, sharding)
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def on_host(module: nnx.Module) -> nnx.Module:
  """`module` with every parameter as a numpy array in this process's memory (gathered from every process)."""
  return _gathered(module, np.asarray)


def local_pipeline(pipe: StableDiffusion) -> StableDiffusion:
  """`pipe` with every parameter gathered onto this process's default device (a collective with several
  processes): what a process needs to write or sample the whole model on its own."""
  if jax.process_count() == 1:
    return pipe
  components = {name: getattr(pipe, name) for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2')}
  return dataclasses.replace(pipe, **{name: _gathered(module, jnp.asarray) for name, module in components.items()
                                      if module is not None})


def _gathered(module: nnx.Module, place) -> nnx.Module:
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(place, gather(state)))
