"""Metric sinks: metrics.jsonl + TensorBoard event files (the progress line: jaxdistill/progress.py)."""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np

from jaxdistill.atomic import atomic_open
from jaxdistill.store.space import DiskFullError, is_disk_full


class MetricsWriter:
  """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` and mirrors the
  scalars to a TensorBoard event file in `<workdir>/tensorboard/`.

  `start_step`: the step the run starts from (the restored checkpoint's, 0 when fresh). Lines of
  later steps, logged before the run was stopped and about to be replayed, are dropped from
  metrics.jsonl, and TensorBoard is told to discard its events from step start_step + 1 on, so
  each step appears once. Both files are written in the calling thread (no background writer
  that could die on a full disk and leave the trainer blocked on its queue): a full disk is one
  DiskFullError naming the file."""

  def __init__(self, workdir: str, start_step: int):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      _keep_steps_up_to(self.path, start_step)
    with _disk_full_names(self.path, "open"):
      self._jsonl = open(self.path, "a", buffering=1)
    self._tb = _TensorBoard(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    with _disk_full_names(self.path, f"append step {step} to"):
      self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    with _disk_full_names(self._tb.path, f"append step {step} to"):
      self._tb.write(step, clean)

  def close(self) -> None:
    """Closes both files; a full disk here is not raised (whatever hit it first reports it, and
    the lines already written are whole: a resume drops a cut one)."""
    for sink in (self._jsonl, self._tb):
      try:
        sink.close()
      except OSError as e:
        if not is_disk_full(e):
          raise


class NoMetricsWriter:
  """MetricsWriter's stand-in on every process but the first (which alone writes the files)."""

  def write(self, step: int, scalars: dict[str, float]) -> None:
    del step, scalars

  def close(self) -> None:
    pass


@contextlib.contextmanager
def _disk_full_names(path: str, action: str):
  try:
    yield
  except OSError as e:
    if not is_disk_full(e):
      raise
    raise DiskFullError(f"disk full: cannot {action} {path}: free some space and rerun the same "
                        "command (it resumes from the last checkpoint)") from None


class _TensorBoard:
  """A TensorBoard event file written synchronously (tensorboardX's record writer and protos).

  purge_step: TensorBoard hides this directory's earlier events of steps >= purge_step (the
  SessionLog START a resumed run writes first)."""

  def __init__(self, logdir: str, purge_step: int):
    from tensorboardX.event_file_writer import EventsWriter   # only the training process needs it
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.summary import scalar
    self._event, self._scalar = Event, scalar
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventsWriter(os.path.join(logdir, "events"),
                                filename_suffix=f".{os.getpid()}.from{purge_step}")
    self.path = logdir
    self._writer.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
    self._writer.flush()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    now = time.time()
    for k, v in scalars.items():
      self._writer.write_event(self._event(wall_time=now, step=step, summary=self._scalar(k, v)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


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
