"""Device mesh and placement rules for training.

The mesh has two axes: `data` splits the batch, `fsdp` splits parameters (fully sharded data parallel:
each large tensor lives in pieces, one per `fsdp` device, and XLA gathers it where a layer needs it). The
same rule places the frozen base, the trained subset and the Adam moments, so the optimizer state of a
tensor sits with the tensor. On a multi-host pod call `jax.distributed.initialize()` first (main.py does
with `--config.mesh.distributed=True`); the mesh then spans every host's devices.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp')


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 on one axis takes what the other leaves."""
  n = jax.device_count()
  if data == -1 and fsdp == -1:
    raise ValueError('mesh: at most one of mesh.data and mesh.fsdp may be -1.')
  data = n // fsdp if data == -1 else data
  fsdp = n // data if fsdp == -1 else fsdp
  if data * fsdp != n or data < 1 or fsdp < 1:
    raise ValueError(f'mesh: data × fsdp = {data} × {fsdp} does not use the {n} devices; choose sizes whose '
                     'product is the device count (or -1 for one of them).')
  # Auto axes: shardings are placed on jit's inputs and outputs and XLA propagates them inside (the model
  # code stays free of sharding annotations).
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def param_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
  """Splits the largest axis divisible by the fsdp size, for tensors of at least `min_size` elements."""
  fsdp = mesh.shape['fsdp']
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return P()
  axes = sorted((d for d in range(len(shape)) if shape[d] % fsdp == 0), key=lambda d: -shape[d])
  if not axes:
    return P()
  spec = [None] * len(shape)
  spec[axes[0]] = 'fsdp'
  return P(*spec)


def param_shardings(params: Mapping[str, jax.Array], mesh: Mesh, min_size: int) -> dict[str, NamedSharding]:
  return {k: NamedSharding(mesh, param_spec(tuple(v.shape), mesh, min_size)) for k, v in params.items()}


def like_params(tree, shardings: Mapping[str, NamedSharding], mesh: Mesh):
  """Shardings for a pytree whose dict leaves are keyed like the parameters (e.g. Adam's mu and nu);
  every other leaf (step counters) is replicated."""
  def rule(path, _):
    key = next((p.key for p in reversed(path) if isinstance(p, jax.tree_util.DictKey)), None)
    return shardings.get(key, NamedSharding(mesh, P()))
  return jax.tree_util.tree_map_with_path(rule, tree)


def batch_sharding(mesh: Mesh, batch: int, ndim: int) -> NamedSharding:
  """Split a batch over `data` when it divides evenly; replicate it otherwise."""
  if batch % mesh.shape['data']:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P('data', *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
