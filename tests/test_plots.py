"""Run figures (evaluate/plots.py, jaxdistill/plot.py) on a hand-written workdir."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import matplotlib.image
import pytest

from jaxdistill.atomic import write_json_atomic
from jaxdistill.evaluate import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The layout evaluate/run.py + train/loop.py write (a tiny LoopITR run's eval.json).
EVAL = {
    "split": "test",
    "dual": {"i2t_r1": 1.5625, "i2t_r5": 6.25, "i2t_r10": 10.9375, "t2i_r1": 3.125,
             "t2i_r5": 9.0625, "t2i_r10": 14.6875, "rsum": 45.625, "query_ms": 19.87,
             "binding": 45.3125},
    "dual+rerank@16": {"i2t_r1": 4.6875, "i2t_r5": 7.8125, "i2t_r10": 15.625, "t2i_r1": 1.875,
                       "t2i_r5": 9.0625, "t2i_r10": 17.1875, "rsum": 56.25, "query_ms": 30.54,
                       "binding": None},
    "rerank_timing": {"seconds": 4.1, "pairs_requested": 6144, "pairs_scored": 5623,
                      "ms_per_query": 10.7, "i2t_ms_per_query": 11.7, "t2i_ms_per_query": 11.7},
    "train_seconds_this_run": 80.9,
    "step": 8,
}


def _record(step: int, **extra) -> str:
  values = {"step": step, "loss": 10.0 - step, "itc": 3.0 - 0.1 * step, "itc_i2t": 3.1,
            "itc_t2i": 2.9, "itm": 0.7, "itm_acc": 0.5, "mlm": 5.0, "distill": 4.0,
            "distill_weight": 0.0, "grad_norm": 2.0, "learning_rate": 1e-4 * step, **extra}
  return json.dumps(values)


def _workdir(tmp_path, with_eval: bool = True) -> str:
  """metrics.jsonl with 5 steps, step 3 logged twice (a resume), a NaN, a line cut by a kill
  (line 5) and a record without a step (line 7)."""
  lines = [_record(1), _record(2), _record(3, loss=float("nan")), _record(3),
           _record(4)[:25], _record(4), json.dumps({"loss": 1.0}), _record(5), ""]
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("\n".join(lines))
  if with_eval:
    write_json_atomic(str(workdir / "eval.json"), EVAL)
  return str(workdir)


def _check_png(path: str, size_inches: tuple[float, float]) -> None:
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  height, width, _ = matplotlib.image.imread(path).shape
  assert (width, height) == (round(size_inches[0] * plots.DPI), round(size_inches[1] * plots.DPI))


def test_read_metrics_skips_corrupt_lines_and_keeps_last_record_per_step(tmp_path):
  log = plots.read_metrics(os.path.join(_workdir(tmp_path), "metrics.jsonl"))
  assert log.corrupt_lines == [5, 7]
  assert log.steps.tolist() == [1, 2, 3, 4, 5]
  assert log.series["loss"].tolist() == [9.0, 8.0, 7.0, 6.0, 5.0]   # the re-run step 3 wins


def test_read_metrics_turns_non_finite_values_into_gaps(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": NaN, "itc": Infinity}\n{"step": 2, "loss": 1.0, "x": "a"}\n')
  log = plots.read_metrics(str(path))
  assert math.isnan(log.series["loss"][0]) and math.isnan(log.series["itc"][0])
  assert math.isnan(log.series["itc"][1]) and "x" not in log.series and not log.corrupt_lines


def test_write_plots_writes_valid_pngs(tmp_path, capsys):
  workdir = _workdir(tmp_path)
  paths = plots.write_plots(workdir)
  assert paths == [os.path.join(workdir, "plots", name) for name in ("training.png", "recall.png")]
  # loss, itc, itm, mlm, distill, learning rate: 6 panels on 2 rows of 3
  _check_png(paths[0], (plots.PANEL_INCHES[0] * plots.COLUMNS, plots.PANEL_INCHES[1] * 2))
  _check_png(paths[1], (plots.PANEL_INCHES[0] * plots.COLUMNS, plots.PANEL_INCHES[1] * 1.5))
  assert "skipped 2 corrupt line(s)" in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(workdir, "plots"))) == ["recall.png", "training.png"]


def test_write_plots_without_eval_json_draws_training_only(tmp_path):
  workdir = _workdir(tmp_path, with_eval=False)
  assert plots.write_plots(workdir) == [os.path.join(workdir, "plots", "training.png")]


def test_missing_metrics_names_the_path_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"run/metrics.jsonl does not exist: train first"):
    plots.write_plots(str(tmp_path / "run"))


def test_cli_writes_each_runs_plots_and_the_comparison(tmp_path):
  first = _workdir(tmp_path)
  other = tmp_path / "other"
  other.mkdir()
  (other / "metrics.jsonl").write_text(_record(1) + "\n" + _record(2) + "\n")
  out = tmp_path / "out"
  done = subprocess.run([sys.executable, "-m", "jaxdistill.plot", f"--workdir={first}",
                         f"--workdir={other}", f"--out={out}"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stdout + done.stderr
  assert os.path.isfile(other / "plots" / "training.png")
  _check_png(str(out / "compare.png"), (plots.PANEL_INCHES[0] * plots.COLUMNS,
                                        plots.PANEL_INCHES[1] * 2))
  missing = subprocess.run([sys.executable, "-m", "jaxdistill.plot", f"--workdir={tmp_path}/none"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
  assert missing.returncode == 2 and "none/metrics.jsonl does not exist" in missing.stderr
