"""A resumed run's MetricsWriter: metrics.jsonl keeps the steps up to the restored one, so each
step appears once, and TensorBoard is told to purge the replayed steps' events."""

import glob
import json
import os
import struct

from tensorboardX.proto.event_pb2 import Event, SessionLog

from jaxdistill.train.metrics import MetricsWriter


def _steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def _events(path) -> list[Event]:
  """The Event records of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  events, data = [], open(path, "rb").read()
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    events.append(Event.FromString(data[12:12 + length]))
    data = data[12 + length + 4:]
  return events


def _write(workdir, start, steps):
  writer = MetricsWriter(str(workdir), start)
  for step in steps:
    writer.write(step, {"loss": float(step)})
  writer.close()


def test_resume_drops_the_replayed_steps(tmp_path):
  _write(tmp_path, 0, range(1, 8))           # killed after logging step 7 ...
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "lo')                # ... in the middle of step 8's line
  _write(tmp_path, 4, [5, 6])                # resumed from the step-4 checkpoint
  assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
  assert losses == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  # TensorBoard: the resumed run's events start with a purge of steps >= 5.
  files = glob.glob(str(tmp_path / "tensorboard" / "events.*"))
  starts = [e.step for path in files for e in _events(path)
            if e.session_log.status == SessionLog.START]
  assert 5 in starts

def test_fresh_start(tmp_path):
  workdir = tmp_path / "new_run"
  _write(workdir, 0, [1, 2])
  assert _steps(workdir) == [1, 2]
  _write(workdir, 0, [1])                    # started over (no checkpoint): old lines go
  assert _steps(workdir) == [1]
