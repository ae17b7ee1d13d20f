"""Chaos on the tiny preset: a run killed at 5 random moments (SIGKILL, some while a checkpoint
is being written, and one SIGTERM) and restarted each time ends with the per-step losses of an
uninterrupted run with the same seed, each step logged once, and its evaluation."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import logged_losses, user_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
KILLS = 5


def _command(workdir):
  return [sys.executable, "-m", "jaxdistill.main", "--config=configs/loopitr.py:tiny",
          f"--workdir={workdir}", f"--config.train.num_steps={STEPS}",
          "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def _logged(workdir) -> int:
  try:
    return max(logged_losses(workdir), default=0)
  except (OSError, ValueError):   # not there yet, or a line being written
    return 0


def _writing_checkpoint(workdir) -> bool:
  """Whether orbax is writing a checkpoint now (its temporary directory exists)."""
  try:
    return any("tmp" in name for name in os.listdir(os.path.join(workdir, "checkpoints")))
  except OSError:
    return False


def _run_and_kill(workdir, moment: str, after_step: int, sig) -> tuple[int, str, bool]:
  """Starts the run; once `after_step` is logged (counting from where it resumed), sends `sig`
  at `moment`: "checkpoint" (as soon as a checkpoint write is seen in progress) or "now".
  Returns (exit code, output, whether a checkpoint was being written when the signal went)."""
  proc = subprocess.Popen(_command(workdir), cwd=REPO, env=user_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  start, deadline, mid_save = _logged(workdir), time.time() + 300, False
  while time.time() < deadline and proc.poll() is None:
    if _logged(workdir) >= min(start + after_step, STEPS - 1):
      mid_save = _writing_checkpoint(workdir)
      if moment == "now" or mid_save or _logged(workdir) >= STEPS - 1:
        break
    time.sleep(0.002)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out, mid_save


@pytest.mark.slow
def test_random_kills_and_restarts_match_an_uninterrupted_run(tmp_path):
  reference = tmp_path / "reference"
  done = subprocess.run(_command(reference), cwd=REPO, env=user_env(), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  expected = logged_losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))
  eval_json = json.loads((reference / "eval.json").read_text())
  assert "dual" in eval_json and "binding" in eval_json["dual"]

  chaos, rng = tmp_path / "chaos", random.Random(18)
  plan = [("checkpoint", signal.SIGKILL), ("now", signal.SIGKILL), ("checkpoint", signal.SIGKILL),
          ("now", signal.SIGTERM), ("checkpoint", signal.SIGKILL)]
  rng.shuffle(plan)
  mid_saves = 0
  for moment, sig in plan[:KILLS]:
    code, out, mid_save = _run_and_kill(chaos, moment, rng.randint(1, 3), sig)
    mid_saves += mid_save
    if sig == signal.SIGTERM:
      assert code == 0 and "SIGTERM: saved step" in out, out
    else:
      assert code == -signal.SIGKILL, out
  assert mid_saves >= 1   # at least one kill landed while a checkpoint was being written
  finish = subprocess.run(_command(chaos), cwd=REPO, env=user_env(), capture_output=True,
                          text=True, timeout=600)
  assert finish.returncode == 0, finish.stdout + finish.stderr
  assert "resumed from" in finish.stdout
  steps = [json.loads(line)["step"] for line in (chaos / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, STEPS + 1))   # each step logged once, across 6 processes
  got = logged_losses(chaos)
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
  recalls = lambda row: {k: v for k, v in row.items() if not k.endswith("_ms")}   # not timings
  assert recalls(json.loads((chaos / "eval.json").read_text())["dual"]) == recalls(eval_json["dual"])
