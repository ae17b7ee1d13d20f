"""Metric sinks: metrics.jsonl + TensorBoard event files (the progress line: jaxdistill/progress.py)."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxdistill.atomic import atomic_open


class MetricsWriter:
  """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` and mirrors the
  scalars to TensorBoard event files in `<workdir>/tensorboard/`.

  `start_step`: the step the run starts from (the restored checkpoint's, 0 when fresh). Lines of
  later steps, logged before the run was stopped and about to be replayed, are dropped from
  metrics.jsonl, and TensorBoard is told to discard its events from step start_step + 1 on, so
  each step appears once."""

  def __init__(self, workdir: str, start_step: int):
    from tensorboardX import SummaryWriter  # imported here: only the training process needs it
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      _keep_steps_up_to(path, start_step)
    self._jsonl = open(path, "a", buffering=1)
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()


def _keep_steps_up_to(path: str, step: int) -> None:
  """Rewrites metrics.jsonl (atomically) with only its lines of steps <= `step`; a line cut short
  when the run was killed is dropped too."""
  with open(path) as f:
    lines = f.readlines()
  with atomic_open(path, "w") as f:
    for line in lines:
      try:
        keep = json.loads(line)["step"] <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        f.write(line.rstrip("\n") + "\n")


class SkipCounter:
  """Running totals of the training items the input pipeline skipped (missing or corrupt images,
  captionless items: data/real/pipeline.py's batch["stats"]), this process's, kept in the
  checkpoint metadata so a resumed run goes on counting."""

  def __init__(self):
    self.totals: dict[str, int] = {}

  def take(self, batch: dict) -> dict:
    """The batch without its "stats" entry, whose counts are added to the totals."""
    if "stats" not in batch:
      return batch
    batch = dict(batch)
    for reason, count in batch.pop("stats").items():
      self.totals[reason] = self.totals.get(reason, 0) + int(count)
    return batch

  def reset(self) -> None:
    self.totals = {}

  def restore(self, totals: dict) -> None:
    self.totals = {k: int(v) for k, v in totals.items()}

  def metrics(self, nonzero: bool = False) -> dict[str, int]:
    """{"skipped_<reason>": total} (nonzero: only reasons that occurred)."""
    return {f"skipped_{k}": v for k, v in self.totals.items() if v or not nonzero}
