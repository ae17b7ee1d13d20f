"""Orbax checkpoints of the TrainState plus JSON metadata (data-iterator state, config).

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save never leaves a half-written checkpoint that a resume would read.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdistill.errors import JaxDistillError


class CheckpointMismatchError(JaxDistillError, ValueError):
  """A checkpoint whose params do not fit the tree a run expects (names the key and shapes)."""


class Checkpointer:
  """`<workdir>/checkpoints/<step>/{state,meta}`; keeps the newest `max_to_keep`."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if wait:
      self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores onto the shardings of `abstract_state` (a pytree of jax.ShapeDtypeStruct
    with `.sharding`, e.g. from `jax.eval_shape` + the target shardings)."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_raw(self, step: int) -> Any:
    """The saved state as plain arrays on this process's first device, whatever mesh saved it
    (the target is built from the checkpoint's own metadata)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = self._manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata, is_leaf=lambda m: hasattr(m, "shape"))
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_params(workdir: str, expected: Any) -> Any:
  """The params of the latest checkpoint of another run (a frozen teacher, or towers to start from).

  expected: pytree of ShapeDtypeStruct the params must match; a missing, unexpected or
  mis-shaped key raises one error naming the key with both shapes. When `expected` is a dict of
  modules ({"student": ...}), the checkpoint's other modules (a recipe's extra trainable
  modules: MCAD's integration module, DINO's projection head) are not read."""
  checkpointer = Checkpointer(workdir)
  step = checkpointer.latest_step()
  if step is None:
    raise CheckpointMismatchError(f"no checkpoint under {checkpointer.directory}: point at the "
                            "--workdir of a finished run")
  params = checkpointer.restore_raw(step)["params"]
  checkpointer.close()
  if isinstance(expected, dict) and isinstance(params, dict):
    params = {k: v for k, v in params.items() if k in expected}
  where = f"checkpoint {checkpointer.directory}/{step}"
  fix = "this run's model config must match the one that checkpoint was trained with"
  found = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  for path, want in jax.tree_util.tree_leaves_with_path(expected):
    name = jax.tree_util.keystr(path)
    if name not in found:
      raise CheckpointMismatchError(f"{where} lacks param {name} (expected shape {want.shape}): {fix}")
    shape = tuple(found.pop(name))
    if shape != tuple(want.shape):
      raise CheckpointMismatchError(f"{where}: param {name} has shape {shape}, expected {tuple(want.shape)}: {fix}")
  if found:
    raise CheckpointMismatchError(f"{where} has unexpected params {sorted(found)[:3]}: {fix}")
  return params
