"""End to end on the tiny preset: train, SIGKILL, resume, SIGTERM, finish — and the per-step
losses after each resume equal those of an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import logged_losses, user_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def _command(workdir):
  return [sys.executable, "-m", "jaxdistill.main", "--config=configs/loopitr.py:tiny",
          f"--workdir={workdir}", f"--config.train.num_steps={STEPS}",
          "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def _run_until_logged(workdir, step, sig):
  """Starts the run, waits until `step` is logged, then sends `sig`; returns the exit code."""
  proc = subprocess.Popen(_command(workdir), cwd=REPO, env=user_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and max(logged_losses(workdir), default=0) >= step:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out


@pytest.mark.slow
def test_kill_resume_matches_uninterrupted(tmp_path):
  reference = tmp_path / "reference"
  done = subprocess.run(_command(reference), cwd=REPO, env=user_env(), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "R@sum" in done.stdout or "rsum" in done.stdout.lower()
  expected = logged_losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))
  eval_json = json.loads((reference / "eval.json").read_text())
  assert "dual" in eval_json and "binding" in eval_json["dual"]

  resumed = tmp_path / "resumed"
  code, out = _run_until_logged(resumed, 5, signal.SIGKILL)
  assert code == -signal.SIGKILL, out
  code, out = _run_until_logged(resumed, 7, signal.SIGTERM)
  assert code == 0 and "SIGTERM: saved step" in out, out
  assert "resumed from" in out
  finish = subprocess.run(_command(resumed), cwd=REPO, env=user_env(), capture_output=True, text=True,
                          timeout=600)
  assert finish.returncode == 0, finish.stdout + finish.stderr
  assert "resumed from" in finish.stdout
  got = logged_losses(resumed)
  assert sorted(got) == sorted(expected)
  steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, STEPS + 1))   # the replayed steps were logged once
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
