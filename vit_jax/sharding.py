"""Device meshes and the shardings of batches and train state.

The mesh has three named axes, sized from the config (``-1`` takes the rest):

  data    pure data parallelism: the batch is split, parameters replicated
  fsdp    the batch is split too, and parameters/optimizer state may be sharded
  tensor  model parallelism inside layers (attention heads, MLP hidden units)

Batches are split over ``("data", "fsdp")``. Train state is replicated by default;
``state_shardings`` is the one place where parameter sharding rules apply.
"""

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves ``{"data": -1, "fsdp": 1, "tensor": 1}`` against a device count."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed "
                       f"axes {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for every leaf of the train state (replicated: pure data parallel)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)
