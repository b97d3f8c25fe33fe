"""Device mesh and placement rules for training.

The mesh has three axes: `concept` splits separate erasures (erase.separate_models: model i's trained
tensors and Adam state live on its slice of devices), `data` splits the batch, `fsdp` splits parameters
(fully sharded data parallel: each large tensor lives in pieces, one per `fsdp` device, and XLA gathers it
where a layer needs it). The same rule places the frozen base, the trained subset and the Adam moments, so
the optimizer state of a tensor sits with the tensor; the frozen base is never split over `concept`, so each
concept's devices hold it once (or its fsdp pieces). On a multi-host pod call `jax.distributed.initialize()`
first (main.py does with `--config.mesh.distributed=True`); the mesh then spans every host's devices.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('concept', 'data', 'fsdp')


def make_mesh(data: int = -1, fsdp: int = 1, concept: int = 1) -> Mesh:
  """A (concept, data, fsdp) mesh over all devices; -1 on data or fsdp takes what the others leave."""
  n = jax.device_count()
  if data == -1 and fsdp == -1:
    raise ValueError('mesh: at most one of mesh.data and mesh.fsdp may be -1.')
  if concept < 1 or n % concept:
    raise ValueError(f'mesh: mesh.concept = {concept} does not divide the {n} devices.')
  rest = n // concept
  data = rest // fsdp if data == -1 else data
  fsdp = rest // data if fsdp == -1 else fsdp
  if concept * data * fsdp != n or data < 1 or fsdp < 1:
    raise ValueError(f'mesh: concept × data × fsdp = {concept} × {data} × {fsdp} does not use the {n} devices; '
                     'choose sizes whose product is the device count (or -1 for data or fsdp).')
  # Auto axes: shardings are placed on jit's inputs and outputs and XLA propagates them inside (the model
  # code stays free of sharding annotations).
  return jax.make_mesh((concept, data, fsdp), AXES, axis_types=(AxisType.Auto,) * 3)


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


def batch_sharding(mesh: Mesh, batch: int, ndim: int, *, batch_axis: int = 0) -> NamedSharding:
  """Split a batch (axis `batch_axis` of an ndim-array) over `data` when it divides evenly; else replicate."""
  if batch % mesh.shape['data']:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(*[('data' if d == batch_axis else None) for d in range(ndim)]))


def stacked(sharding: NamedSharding) -> NamedSharding:
  """The placement of a tensor stacked over separate models: the model axis over `concept`, the rest as before."""
  return NamedSharding(sharding.mesh, P('concept', *sharding.spec))


def over_models(mesh: Mesh) -> NamedSharding:
  """Arrays whose leading axis is the model (concept) axis: split over `concept`."""
  return NamedSharding(mesh, P('concept'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
