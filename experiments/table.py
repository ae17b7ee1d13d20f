r"""A results table from finished runs: one row per label, mean ± half the range over its seeds.

  python experiments/table.py "full=runs/ukd_full_s*" "w/o KD=runs/ukd_no_kd_s*" ...

Each LABEL=GLOB names the workdirs of one row (one per seed). Read from each workdir: eval.json
(test split: R@1/5/10 both ways, R@sum, binding), eval_val.json (val R@sum, what choices are made
on), train_seconds_this_run, and the student's parameter count (store/run.py load_run). A
pipeline's workdir (pipeline.json) is read through its last train stage, with the training time
of all its train stages.
Prints a markdown table.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import jax
import numpy as np

from jaxdistill.store.run import load_run

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "binding")


def _read(workdir: str) -> dict:
  if os.path.isfile(os.path.join(workdir, "pipeline.json")):
    return _read_pipeline(workdir)
  with open(os.path.join(workdir, "eval.json")) as f:
    test = json.load(f)
  if test.get("split", "test") != "test":   # trained with --config.eval.split=val
    path = os.path.join(workdir, "eval_test.json")
    if not os.path.isfile(path):
      raise SystemExit(f"{workdir}/eval.json is the {test['split']} split: run --mode=eval "
                       "--config.eval.split=test (it writes eval_test.json)")
    with open(path) as f:
      test = json.load(f)
  row = {k: test["dual"][k] for k in METRICS}
  row["minutes"] = test.get("train_seconds_this_run", float("nan")) / 60
  val_path = os.path.join(workdir, "eval_val.json")
  row["val_rsum"] = float("nan")
  if os.path.isfile(val_path):
    with open(val_path) as f:
      row["val_rsum"] = json.load(f)["dual"]["rsum"]
  params = load_run(workdir).params
  row["params_m"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e6
  return row


def _read_pipeline(workdir: str) -> dict:
  """A pipeline's row (train/pipeline.py): its last train stage (the final student) read as a
  run; minutes = all its train stages' training time, stages reused from another row included
  (what the row costs on its own; mining and start-up not counted)."""
  with open(os.path.join(workdir, "pipeline.json")) as f:
    stages = [s for s in json.load(f)["stages"] if s["kind"] == "train"]
  row = _read(stages[-1]["workdir"])
  seconds = 0.0
  for stage in stages:
    with open(os.path.join(stage["workdir"], "eval.json")) as f:
      seconds += json.load(f).get("train_seconds_this_run", float("nan"))
  row["minutes"] = seconds / 60
  return row


def _cell(values: list[float], digits: int = 1) -> str:
  values = [v for v in values if not np.isnan(v)]
  if not values:
    return "—"
  mean, half = np.mean(values), (max(values) - min(values)) / 2
  return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def main(argv: list[str]) -> None:
  head = ("| row | seeds | val R@sum | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | test R@sum "
          "| binding % | params (M) | train min |")
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  for spec in argv:
    label, _, pattern = spec.partition("=")
    workdirs = sorted(glob.glob(pattern))
    if not workdirs:
      raise SystemExit(f"{label}: no workdir matches {pattern!r}")
    rows = [_read(w) for w in workdirs]
    col = lambda k, d=1: _cell([r[k] for r in rows], d)
    print(f"| {label} | {len(rows)} | {col('val_rsum')} | "
          + " | ".join(col(k) for k in METRICS[:-2]) + f" | {col('rsum')} | {col('binding')} | "
          f"{col('params_m', 2)} | {col('minutes')} |")


if __name__ == "__main__":
  main(sys.argv[1:])
