"""Disk space: check it before a write that would fill the disk, and name the file when one did.

A checkpoint that runs out of space half-way leaves a temporary directory and a storm of
background-thread errors; checking the free space first turns that into one line that says what
could not be written and how much the run needs, while every file already written stays intact.
"""

from __future__ import annotations

import errno
import shutil

from jaxdistill.errors import JaxDistillError

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(JaxDistillError, OSError):
  """No room for a file the run must write (names the file, the space needed and the free space)."""


def human_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def free_bytes(directory: str) -> int:
  return shutil.disk_usage(directory).free


def require_free(directory: str, needed: int, what: str, fix: str) -> None:
  """Raises DiskFullError unless `directory`'s file system has `needed` bytes free.
  what: the file(s) about to be written; fix: what the user can do besides freeing space."""
  free = free_bytes(directory)
  if free < needed:
    raise DiskFullError(f"disk full: {what}: {human_bytes(needed)} needed, {human_bytes(free)} "
                        f"free in {directory}: free some space, {fix}")


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or what it was raised from) is a full disk or quota: an OSError with ENOSPC
  / EDQUOT, or a tensorstore error (orbax) carrying os_error_code 28."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
      return True
    text = str(error)
    if "No space left on device" in text or "os_error_code='28'" in text:
      return True
    error = error.__cause__ or error.__context__
  return False

