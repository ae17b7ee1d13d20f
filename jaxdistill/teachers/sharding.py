"""Places a teacher on the mesh: params replicated, or sharded over the "fsdp" axis when they do
not fit one device. The (jitted) apply functions follow their inputs' shardings; GSPMD gathers
sharded weights where they are used."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdistill.teachers.base import Teacher


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
  """Shards the largest dimension divisible by `fsdp` over "fsdp"; replicated if none is."""
  dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % fsdp == 0]
  if fsdp == 1 or not dims:
    return PartitionSpec()
  spec = [None] * len(shape)
  spec[dims[0]] = "fsdp"
  return PartitionSpec(*spec)


def param_shardings(params, mesh: Mesh, shard: bool):
  """NamedSharding per leaf: replicated, or (shard=True) split over the mesh's fsdp axis."""
  fsdp = mesh.shape["fsdp"] if shard else 1
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), params)


def place(teacher: Teacher, mesh: Mesh, shard: bool = False) -> Teacher:
  """The teacher with params on `mesh` (replicated, or fsdp-sharded with shard=True).
  Inputs may be batch-sharded; outputs follow the inputs' sharding."""
  if shard and "fsdp" not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} have no 'fsdp' axis: build the mesh with "
                     "parallel/mesh.py make_mesh(data, fsdp)")
  params = jax.device_put(teacher.params, param_shardings(teacher.params, mesh, shard))
  return dataclasses.replace(teacher, params=params)
