"""Write a file so that readers see the old version or the whole new one, never half of it.

Standard library and numpy only (the JAX-free `jaxdistill.search` uses it too).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
  """Yields a temporary file next to `path`; on a clean exit it is flushed, fsynced, given mode
  0o644 and renamed onto `path` (and the directory fsynced); on an error it is removed and
  `path` is untouched. Creates the parent directory if needed."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                  suffix=".tmp")
  try:
    with os.fdopen(fd, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp_path, 0o644)
    os.replace(tmp_path, path)
  except BaseException as e:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    if isinstance(e, OSError) and e.filename is None:   # a failed write(): name the file
      raise OSError(e.errno, e.strerror, path) from e
    raise
  dir_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def _to_json(value: Any) -> Any:
  """json.dump's fallback: numpy / jax scalars and arrays become numbers and lists."""
  if isinstance(value, np.generic):
    return value.item()
  if hasattr(value, "__array__"):
    return np.asarray(value).tolist()
  raise TypeError(f"write_json_atomic cannot store a value of type {type(value).__name__}; convert "
                  f"it to a number, string, list or dict first")


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to `path` so readers see the old file or the whole new one, never half.

  Through `jaxdistill.atomic.atomic_open` (temporary file, fsync, rename); on any error `path`
  is untouched. The directory must exist.
  """
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist; create it "
                            f"first")
  with atomic_open(path, "w") as f:
    json.dump(obj, f, indent=2, default=_to_json)
    f.write("\n")
