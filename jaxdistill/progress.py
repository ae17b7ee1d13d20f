"""The progress line of a long job (training, caching, embedding): rate, elapsed, ETA."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """One line per log step: step/total, examples/s, loss parts, elapsed and ETA.

  The ETA uses the throughput since the first logged step after (re)start, so the one-off
  compilation of the step does not distort it."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int, stream=None):
    # stdout at construction (not at import), so that contextlib.redirect_stdout captures it
    self.total, self.batch_size = total_steps, batch_size
    self.stream = sys.stdout if stream is None else stream
    self._t0 = time.time()
    self._ref_step, self._ref_time = None, None
    self._last_step, self._last_time = start_step, self._t0

  def line(self, step: int, scalars: dict[str, float]) -> str:
    now = time.time()
    if self._ref_step is None:
      self._ref_step, self._ref_time = step, now
    ex_s = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    if step > self._ref_step:
      eta = (self.total - step) * (now - self._ref_time) / (step - self._ref_step)
      eta_text = _duration(eta)
    else:
      eta_text = "?"
    parts = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
    return (f"step {step}/{self.total} | {ex_s:7.1f} ex/s | elapsed {_duration(now - self._t0)} "
            f"eta {eta_text} | {parts}")

  def log(self, step: int, scalars: dict[str, float]) -> None:
    print(self.line(step, scalars), file=self.stream, flush=True)
