"""Metric sinks: metrics.jsonl + TensorBoard event files (the progress line: jaxdistill/progress.py)."""

from __future__ import annotations

import json
import os

import numpy as np


class MetricsWriter:
  """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` and mirrors the
  scalars to TensorBoard event files in `<workdir>/tensorboard/`."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # imported here: only the training process needs it
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()
