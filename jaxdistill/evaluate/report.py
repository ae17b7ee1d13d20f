"""Evaluation reports: the plain-text results table.

Owns how results are shown (JSON files are written by `jaxdistill.atomic.write_json_atomic`); computing them lives in `retrieval.py`, `rerank.py` and
`binding.py`.
"""

from __future__ import annotations


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
