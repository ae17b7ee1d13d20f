"""Figures of a run, as PNGs under `<workdir>/plots/`: training curves from `metrics.jsonl` and
recall bars from `eval.json`; plus a comparison figure of several runs.

Figures are drawn on matplotlib's Agg canvas (no display, no pyplot state) and written to a
temporary name, then `os.replace`d, so a reader never sees half a PNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from jaxdistill.atomic import atomic_open

PLOTS_DIR = "plots"
LOSS_PARTS = ("loss", "itc", "itm", "mlm", "distill")   # the parts train/loop.py prints
THROUGHPUT_KEYS = ("examples_per_second", "examples_per_sec")
LEARNING_RATE_KEYS = ("learning_rate", "lr")
RECALL_KEYS = (("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"), ("i2t_r10", "i2t R@10"),
               ("t2i_r1", "t2i R@1"), ("t2i_r5", "t2i R@5"), ("t2i_r10", "t2i R@10"))
BINDING_CHANCE = 50.0                                   # evaluate/binding.py: true vs false caption
PANEL_INCHES = (4.0, 3.0)                               # one training-curve panel
COLUMNS = 3                                             # panels per row
DPI = 100


@dataclasses.dataclass(frozen=True)
class MetricsLog:
  """steps int [S] ascending (the last record of a re-run step wins); series[key] float [S]
  (NaN where a record lacks the key or holds a non-finite value); corrupt_lines: 1-based line
  numbers that were not a JSON object with a numeric "step"."""
  steps: np.ndarray
  series: dict[str, np.ndarray]
  corrupt_lines: list[int]


def _number(value) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else math.nan


def read_metrics(path: str) -> MetricsLog:
  """Parses `metrics.jsonl`, skipping (and counting) corrupt lines and non-numeric values."""
  by_step, corrupt = {}, []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        corrupt.append(number)
        continue
      step = _number(record.get("step")) if isinstance(record, dict) else None
      if step is None or math.isnan(step):
        corrupt.append(number)
        continue
      values = {k: _number(v) for k, v in record.items() if k != "step"}
      by_step[int(step)] = {k: v for k, v in values.items() if v is not None}
  steps = sorted(by_step)
  keys = sorted({k for values in by_step.values() for k in values})
  series = {k: np.array([by_step[s].get(k, math.nan) for s in steps], np.float64) for k in keys}
  return MetricsLog(np.array(steps, np.int64), series, corrupt)


def _metrics_path(workdir: str) -> str:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: train first, e.g. `python -m jaxdistill.main "
                            f"--config=configs/loopitr.py --workdir={workdir}`, then plot")
  return path


def _systems(results: dict) -> dict[str, dict]:
  """The rows of eval.json that are retrieval systems ({"dual": ..., "dual+rerank@16": ...})."""
  return {k: v for k, v in results.items() if isinstance(v, dict) and "rsum" in v}


def _value(metrics: dict, key: str) -> float:
  value = _number(metrics.get(key))
  return math.nan if value is None else value


def _save(fig: Figure, path: str) -> str:
  """Writes `fig` as PNG to `path` atomically (temporary name in the same directory)."""
  FigureCanvasAgg(fig)
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=DPI)
  return path


def _grid(num_panels: int) -> tuple[Figure, list]:
  rows = max(math.ceil(num_panels / COLUMNS), 1)
  fig = Figure(figsize=(PANEL_INCHES[0] * COLUMNS, PANEL_INCHES[1] * rows), layout="constrained")
  axes = fig.subplots(rows, COLUMNS, squeeze=False).ravel()
  for ax in axes[num_panels:]:
    ax.set_visible(False)
  return fig, list(axes[:num_panels])


def _first_key(series: dict, keys: tuple[str, ...]) -> str | None:
  return next((k for k in keys if k in series), None)


def _training_panels(log: MetricsLog) -> list[tuple[str, list[str]]]:
  """(title, keys drawn) per panel: each loss part with its sub-parts (itc_i2t, ...), then
  examples/s and learning rate when logged."""
  panels = []
  for part in LOSS_PARTS:
    if part in log.series:
      subs = [k for k in log.series if k.startswith(part + "_") and
              not k.endswith(("_acc", "_weight"))]
      panels.append((part, [part] + subs))
  for title, keys in (("examples/s", THROUGHPUT_KEYS), ("learning rate", LEARNING_RATE_KEYS)):
    key = _first_key(log.series, keys)
    if key:
      panels.append((title, [key]))
  return panels


def _training_figure(log: MetricsLog, title: str) -> Figure:
  panels = _training_panels(log)
  if not panels:
    raise ValueError(f"{title}: no loss in metrics.jsonl (keys: {sorted(log.series)}); expected "
                     f"one of {', '.join(LOSS_PARTS)}")
  fig, axes = _grid(len(panels))
  for ax, (name, keys) in zip(axes, panels):
    for key in keys:
      ax.plot(log.steps, log.series[key], label=key, marker="." if len(log.steps) < 30 else None)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize="small")
  skipped = f" ({len(log.corrupt_lines)} corrupt line(s) skipped)" if log.corrupt_lines else ""
  fig.suptitle(f"{title}: training{skipped}")
  return fig


def _bar_labels(ax, bars, values) -> None:
  ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.1f}" for v in values],
               fontsize="x-small", padding=1)


def _recall_figure(results: dict, title: str) -> Figure:
  systems = _systems(results)
  fig = Figure(figsize=(PANEL_INCHES[0] * COLUMNS, PANEL_INCHES[1] * 1.5), layout="constrained")
  recall_ax, binding_ax = fig.subplots(1, 2, width_ratios=(3, 1))
  x = np.arange(len(RECALL_KEYS))
  width = 0.8 / max(len(systems), 1)
  for i, (system, metrics) in enumerate(systems.items()):
    values = [_value(metrics, key) for key, _ in RECALL_KEYS]
    bars = recall_ax.bar(x + (i - (len(systems) - 1) / 2) * width, np.nan_to_num(values), width,
                         label=f"{system} (R@sum {_value(metrics, 'rsum'):.1f})")
    _bar_labels(recall_ax, bars, values)
  recall_ax.set_xticks(x, [label for _, label in RECALL_KEYS])
  recall_ax.set_ylim(0, 105)
  recall_ax.set_ylabel("recall %")
  recall_ax.set_title("retrieval recall")
  recall_ax.legend(fontsize="small", loc="upper left")

  binding = [_value(metrics, "binding") for metrics in systems.values()]
  bars = binding_ax.bar(np.arange(len(systems)), np.nan_to_num(binding),
                        color=[f"C{i}" for i in range(len(systems))])
  _bar_labels(binding_ax, bars, binding)
  binding_ax.axhline(BINDING_CHANCE, color="gray", linestyle="--")
  binding_ax.text(0.99, BINDING_CHANCE + 1, f"chance {BINDING_CHANCE:g}%", color="gray",
                  fontsize="small", ha="right", va="bottom", transform=binding_ax.get_yaxis_transform())
  binding_ax.set_xticks(np.arange(len(systems)), list(systems), rotation=15, fontsize="small")
  binding_ax.set_ylim(0, 105)
  binding_ax.set_title("binding probe %")
  where = ", ".join(f"{k} {results[k]}" for k in ("split", "step") if k in results)
  fig.suptitle(f"{title}: evaluation ({where})" if where else f"{title}: evaluation")
  return fig


def read_eval(workdir: str) -> dict | None:
  """`<workdir>/eval.json`, or None when the run has not been evaluated."""
  path = os.path.join(workdir, "eval.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f"{path} is not valid JSON ({e}): rerun the training command with "
                       f"--workdir={workdir} (it evaluates the last checkpoint again)") from e


def _run_name(workdir: str) -> str:
  return os.path.basename(os.path.normpath(os.path.abspath(workdir)))


def write_plots(workdir: str) -> list[str]:
  """Writes `plots/training.png` (and `plots/recall.png` when `eval.json` exists) in `workdir`.

  Returns the paths written. Raises FileNotFoundError naming the path when the workdir has no
  `metrics.jsonl`. Corrupt metrics lines are skipped, counted in the figure title and warned.
  """
  log = read_metrics(_metrics_path(workdir))
  if log.corrupt_lines:
    print(f"warning: skipped {len(log.corrupt_lines)} corrupt line(s) of "
          f"{os.path.join(workdir, 'metrics.jsonl')}: {log.corrupt_lines[:10]}", flush=True)
  name, out = _run_name(workdir), os.path.join(workdir, PLOTS_DIR)
  paths = [_save(_training_figure(log, name), os.path.join(out, "training.png"))]
  results = read_eval(workdir)
  if results is not None and _systems(results):
    paths.append(_save(_recall_figure(results, name), os.path.join(out, "recall.png")))
  return paths


def _labels(workdirs: list[str]) -> list[str]:
  """Workdir basenames, or the paths as given where basenames collide."""
  names = [_run_name(w) for w in workdirs]
  return [n if names.count(n) == 1 else os.path.normpath(w) for n, w in zip(names, workdirs)]


def write_comparison(workdirs: list[str], path: str) -> str:
  """Writes one PNG comparing runs: each loss part's curve per run, and R@sum per system."""
  logs = [read_metrics(_metrics_path(w)) for w in workdirs]
  evals = [read_eval(w) or {} for w in workdirs]
  labels = _labels(workdirs)
  parts = [p for p in LOSS_PARTS if any(p in log.series for log in logs)]
  fig, axes = _grid(len(parts) + 1)
  for ax, part in zip(axes, parts):
    for i, (log, label) in enumerate(zip(logs, labels)):
      if part in log.series:
        ax.plot(log.steps, log.series[part], label=label, color=f"C{i}")
    ax.set_title(part)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  rsum_ax = axes[-1]
  systems = list(dict.fromkeys(s for results in evals for s in _systems(results)))
  x = np.arange(len(workdirs))
  width = 0.8 / max(len(systems), 1)
  for i, system in enumerate(systems):
    values = [_value(_systems(results).get(system, {}), "rsum") for results in evals]
    bars = rsum_ax.bar(x + (i - (len(systems) - 1) / 2) * width, np.nan_to_num(values), width,
                       label=system)
    _bar_labels(rsum_ax, bars, values)
  rsum_ax.set_xticks(x, labels, rotation=15, fontsize="small")
  rsum_ax.set_title("R@sum (max 600)")
  if systems:
    rsum_ax.legend(fontsize="small")
  else:
    rsum_ax.text(0.5, 0.5, "no eval.json", ha="center", va="center", transform=rsum_ax.transAxes)
  fig.suptitle("comparison: " + ", ".join(labels))
  return _save(fig, path)
