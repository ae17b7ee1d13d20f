"""Orbax checkpoints of the TrainState plus JSON metadata (data-iterator state, config).

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save never leaves a half-written checkpoint that a resume would read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdistill.errors import JaxDistillError
from jaxdistill.store.space import DiskFullError, human_bytes, is_disk_full, require_free

# Room asked for beyond a checkpoint's array bytes (orbax's metadata files, the JSON meta).
_CHECKPOINT_OVERHEAD = 1 << 20


class CheckpointMismatchError(JaxDistillError, ValueError):
  """A checkpoint whose params do not fit the tree a run expects (names the key and shapes)."""


class Checkpointer:
  """`<workdir>/checkpoints/<step>/{state,meta}`; keeps the newest `max_to_keep`.

  Saves check the free space first (a checkpoint that would not fit is one DiskFullError naming
  it and the space the run needs, before orbax writes anything); a disk that fills during a write
  is reported the same way. Checkpoints already written are never touched by a failed save."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.max_to_keep = max_to_keep
    self._size = _CHECKPOINT_OVERHEAD   # bytes of one checkpoint, known from the first save
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def require_space(self, state: Any, *, saves: int = 1, step: int | None = None) -> None:
    """Raises DiskFullError unless there is room for the next `saves` checkpoints of `state`
    (at the peak max_to_keep + 1 are on disk; those already there count). Only a statvfs."""
    size = tree_bytes(state) + _CHECKPOINT_OVERHEAD
    count = min(saves, max(self.max_to_keep + 1 - len(self._manager.all_steps()), 1))
    what = (f"cannot write checkpoint {step}" if step is not None else
            f"no room for this run's next {count} checkpoint(s) of {human_bytes(size)}")
    require_free(self.directory, count * size, what, self._fix(size))

  def _fix(self, size: int) -> str:
    return (f"lower --config.train.max_checkpoints (now {self.max_to_keep}: the run needs about "
            f"{human_bytes((self.max_to_keep + 1) * size)} for its checkpoints) or choose another "
            "--workdir, then rerun the same command")

  def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> None:
    self._size = tree_bytes(state) + _CHECKPOINT_OVERHEAD
    with self._disk_full_as_error():
      self._manager.wait_until_finished()   # the previous save's bytes are on disk: count them
      self.require_space(state, step=step)
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      if wait:
        self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _disk_full_as_error(self):
    """Turns orbax's error for a disk that filled during an (asynchronous) write into one
    DiskFullError; the checkpoint being written stays a temporary directory a resume ignores."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise ValueError, OSError, ...
      if isinstance(e, DiskFullError) or not is_disk_full(e):
        raise
      raise DiskFullError(f"disk full while writing a checkpoint under {self.directory} (the "
                          "checkpoints already there are complete): free some space, "
                          f"{self._fix(self._size)}") from None

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
    with self._disk_full_as_error():
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class _DropDiskFull(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (is_disk_full(record.exc_info[1]) if record.exc_info else
                is_disk_full(Exception(record.getMessage())))


def _drop_closed_loop(previous):
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  return hook


def quiet_failed_save_noise(logger: logging.Logger) -> None:
  """When a checkpoint write fails on a full disk (reported as one DiskFullError), orbax logs
  a traceback per background write thread on `logger` (absl's), and tensorstore reports, as
  unraisable, RuntimeError("Event loop is closed") for each write that finishes after orbax has
  closed that save's event loop. Drops those two; every other record and error passes."""
  logger.addFilter(_DropDiskFull())
  sys.unraisablehook = _drop_closed_loop(sys.unraisablehook)


def tree_bytes(tree: Any) -> int:
  """Bytes of the (global) arrays of `tree`: what a checkpoint of it stores."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


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
