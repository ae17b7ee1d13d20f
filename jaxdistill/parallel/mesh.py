"""The device mesh and the two shardings everything else uses (batch-sharded and replicated).

Axes: "data" (data parallelism) and "fsdp" (reserved for sharding large params); the batch
dimension is sharded over both, so a mesh of data * fsdp devices holds batch / (data * fsdp) rows
per device. All axes are AxisType.Auto (the compiler propagates shardings inside jit).
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all devices of all processes).

  data = -1 takes all devices left after fsdp. Raises ValueError naming mesh.data / mesh.fsdp
  when data * fsdp does not equal the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the {n} devices: "
                     f"set --config.mesh.fsdp to one of {[d for d in range(1, n + 1) if n % d == 0]}")
  if data == -1:
    data = n // fsdp
  if data < 1 or data * fsdp != n:
    raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} must equal the {n} devices: "
                     f"set --config.mesh.data={n // fsdp} (or -1 for all devices left after fsdp)")
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension sharded over ("data", "fsdp"), other dimensions replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (params, optimizer state, scalars)."""
  return NamedSharding(mesh, PartitionSpec())
