"""Evaluation reports: the plain-text results table, and the dual-encoder recalls in
CLIP_benchmark's retrieval output format.

Owns how results are shown (JSON files are written by `jaxdistill.atomic.write_json_atomic`); computing them lives in `retrieval.py`, `rerank.py` and
`binding.py`.
"""

from __future__ import annotations

CLIP_BENCHMARK_TASK = "zeroshot_retrieval"
# CLIP_benchmark (LAION-AI/CLIP_benchmark, clip_benchmark/metrics/zeroshot_retrieval.py) ranks
# images for each caption in "image_retrieval" (our t2i) and captions for each image in
# "text_retrieval" (our i2t).
_CLIP_BENCHMARK_DIRECTIONS = (("image_retrieval", "t2i"), ("text_retrieval", "i2t"))


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


def clip_benchmark_result(metrics: dict[str, float], *, dataset: str, model: str,
                          pretrained: str, ks: tuple[int, ...] = (1, 5, 10),
                          language: str = "en") -> dict:
  """One retrieval result as CLIP_benchmark's `clip_benchmark eval` writes it (cli.py's dump):
  {"dataset", "model", "pretrained", "task": "zeroshot_retrieval", "metrics", "language"}, metrics
  {"image_retrieval_recall@k": t2i_r{k} / 100, "text_retrieval_recall@k": i2t_r{k} / 100} for k
  in ks: fractions in [0, 1], from our recalls in percent (`retrieval.recall_at_k` keys).

  Both count a query as a hit at k when a gold item is in its top k; our ties are pessimistic
  (`retrieval.py`) where CLIP_benchmark takes torch.topk's order, which only matters for exactly
  equal scores.
  """
  missing = [f"{ours}_r{k}" for _, ours in _CLIP_BENCHMARK_DIRECTIONS for k in ks
             if f"{ours}_r{k}" not in metrics]
  if missing:
    raise KeyError(f"clip_benchmark_result needs the recalls {missing} (recall_at_k with ks={ks})")
  recalls = {f"{theirs}_recall@{k}": float(metrics[f"{ours}_r{k}"]) / 100.0
             for theirs, ours in _CLIP_BENCHMARK_DIRECTIONS for k in ks}
  return {"dataset": dataset, "model": model, "pretrained": pretrained,
          "task": CLIP_BENCHMARK_TASK, "metrics": recalls, "language": language}
