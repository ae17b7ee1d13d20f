"""Evaluation reports: the plain-text results table and atomic JSON files.

Owns how results are shown and stored; computing them lives in `retrieval.py`, `rerank.py` and
`binding.py`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from jaxdistill.atomic import atomic_open

# (metric key, column header, format)
_COLUMNS = (("i2t_r1", "i2t R@1", "{:.1f}"), ("i2t_r5", "R@5", "{:.1f}"),
            ("i2t_r10", "R@10", "{:.1f}"), ("t2i_r1", "t2i R@1", "{:.1f}"),
            ("t2i_r5", "R@5", "{:.1f}"), ("t2i_r10", "R@10", "{:.1f}"),
            ("rsum", "R@sum", "{:.1f}"), ("binding", "binding %", "{:.1f}"),
            ("query_ms", "query ms", "{:.3f}"))


def format_table(results: dict[str, dict[str, float]]) -> str:
  """Plain-text table, one row per system ({"dual": metrics, "dual+rerank@16": metrics, ...}).

  Columns: i2t R@1 R@5 R@10, t2i R@1 R@5 R@10, R@sum, binding probe % ("binding"), query ms
  ("query_ms"); a missing (or None) value shows as "-".
  """
  header = ["system"] + [title for _, title, _ in _COLUMNS]
  rows = [[system] + ["-" if metrics.get(key) is None else fmt.format(metrics[key])
                      for key, _, fmt in _COLUMNS]
          for system, metrics in results.items()]
  widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]

  def line(cells: list[str]) -> str:
    return "  ".join([cells[0].ljust(widths[0])] +
                     [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])])

  return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


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
