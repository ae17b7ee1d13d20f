"""Frozen teachers: `Teacher` (params + pure apply functions), `MultiTeacher` (named
teachers used at once, MCAD), `load_teacher(spec)`, and the offline feature cache (cache.py)."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from jaxdistill.errors import JaxDistillError
from jaxdistill.teachers.base import Teacher
from jaxdistill.teachers.multi import MultiTeacher

__all__ = ["Teacher", "MultiTeacher", "load_teacher", "KINDS"]

# kind -> "module:function"; called as function(path, dtype=dtype) -> Teacher; imported only when chosen.
KINDS = {
    "workdir": "jaxdistill.teachers.workdir:from_workdir",
    "pretrained": "jaxdistill.teachers.pretrained:from_checkpoint",
    "cache": "jaxdistill.teachers.cache:from_cache",
}


class TeacherError(JaxDistillError, ValueError):
  """A teacher spec that names no loadable teacher."""


def load_teacher(spec: Any) -> Teacher | MultiTeacher:
  """A Teacher from `spec`: the config's teacher section (kind, path, dtype), or a string
  "kind:path"; or a MultiTeacher from {name: spec, ...}, e.g. {"dual": ..., "cross": ...}."""
  if isinstance(spec, str):
    kind, sep, path = spec.partition(":")
    if not sep:
      raise TeacherError(f"teacher spec {spec!r} must read KIND:PATH with KIND one of {', '.join(KINDS)}")
    spec = {"kind": kind, "path": path, "dtype": "float32"}
  if isinstance(spec, Mapping) and "kind" not in spec:
    return MultiTeacher({name: load_teacher(s) for name, s in spec.items()})
  kind, path, dtype = spec["kind"], spec["path"], spec.get("dtype", "float32")
  if kind not in KINDS:
    raise TeacherError(f"teacher kind {kind!r} is unknown: use one of {', '.join(KINDS)} "
                     "(--config.teachers.<name>.kind)")
  if not path:
    raise TeacherError(f"teacher kind {kind!r} needs a path: set --config.teachers.<name>.path")
  module_name, function_name = KINDS[kind].split(":")
  return getattr(importlib.import_module(module_name), function_name)(path, dtype=dtype)
