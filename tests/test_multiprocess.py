"""Several processes (jax.distributed over gloo, launch/local_multiprocess.sh): 2 processes x 4
CPU devices train with the per-step losses of 1 process x 8 devices (LoopITR, CPRD); SIGTERM
reaching the processes one after the other saves one agreed step and every process exits 0; that
checkpoint restores into 1 process, which continues with the same losses. About 4 minutes on 2
CPU cores."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import logged_losses

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
COMMON = [f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
          "--config.eval.split=val"]


def _env(devices: int | None = None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices else ""
  return env


def _one_process(config: str, workdir, *overrides) -> str:
  """1 process x 8 devices; returns its output (asserts exit 0)."""
  proc = subprocess.run([sys.executable, "-m", "jaxdistill.main", f"--config={config}",
                         f"--workdir={workdir}", *COMMON, *overrides], cwd=REPO, env=_env(8),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:]
  return proc.stdout


def _launch(config: str, workdir, *overrides) -> subprocess.Popen:
  """launch/local_multiprocess.sh: 2 processes x 4 devices."""
  return subprocess.Popen(["launch/local_multiprocess.sh", "2", config, str(workdir), *COMMON,
                           *overrides], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _two_processes(config: str, workdir, *overrides) -> str:
  proc = _launch(config, workdir, *overrides)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-4000:]
  return out


def _assert_same_losses(many: dict, one: dict, steps) -> None:
  for step in steps:
    np.testing.assert_allclose(many[step], one[step], rtol=1e-5, atol=1e-5, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def loopitr_one(tmp_path_factory):
  """The 1-process LoopITR run (the reference, and CPRD's frozen teacher)."""
  work = tmp_path_factory.mktemp("loopitr_one")
  _one_process("configs/loopitr.py:tiny", work)
  return work


def test_loopitr_two_processes_match_one(loopitr_one, tmp_path):
  two = tmp_path / "two"
  _two_processes("configs/loopitr.py:tiny", two)
  one_losses = logged_losses(loopitr_one)
  assert sorted(logged_losses(two)) == list(range(1, STEPS + 1))   # each step logged once
  _assert_same_losses(logged_losses(two), one_losses, range(1, STEPS + 1))
  for name in ("config.json", "eval.json", "tokenizer.json"):   # process 0's files
    assert os.path.exists(two / name), name
  assert len(os.listdir(two / "tensorboard")) == 1             # one writer, not one per process
  assert json.loads((two / "eval.json").read_text())["step"] == STEPS
  assert sorted(os.listdir(two / "checkpoints")) == ["4", "6"]   # orbax, every process saving
  # (restoring a 2-process checkpoint into 1 process: the CPRD test below, queue included)


def _wait_for_step(workdir, step: int, proc: subprocess.Popen) -> None:
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    try:
      if max(logged_losses(workdir), default=0) >= step:
        return
    except (OSError, ValueError):
      pass
    time.sleep(0.05)
  raise AssertionError(f"step {step} never logged: {proc.communicate()[0][-4000:]}")


def test_cprd_two_processes_sigterm_then_resume_in_one(loopitr_one, tmp_path):
  cprd = [f"--config.teachers.teacher.path={loopitr_one}"]
  one, two = tmp_path / "one", tmp_path / "two"
  _one_process("configs/cprd.py:tiny", one, *cprd)
  proc = _launch("configs/cprd.py:tiny", two, *cprd, "--config.train.checkpoint_every=100")
  first = proc.stdout.readline()
  assert first.startswith("processes: "), first
  pids = [int(p) for p in first.split()[1:3]]
  _wait_for_step(two, 2, proc)
  os.kill(pids[1], signal.SIGTERM)       # one process first: both must stop at the same step
  time.sleep(1.0)
  try:
    os.kill(pids[0], signal.SIGTERM)     # the other one later (saving by now, or even gone)
  except ProcessLookupError:
    pass
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out[-4000:]   # the script's: the first nonzero of the processes
  saved = [int(n) for n in os.listdir(two / "checkpoints")]
  assert len(saved) == 1, os.listdir(two / "checkpoints")   # one complete checkpoint, no tmp dir
  step = saved[0]
  assert 2 <= step < STEPS
  assert out.count(f"SIGTERM: saved step {step} to") == 2, out[-4000:]   # both, the same step
  one_losses = logged_losses(one)
  _assert_same_losses(logged_losses(two), one_losses, range(1, step + 1))

  out = _one_process("configs/cprd.py:tiny", two, *cprd)   # resumes in 1 process x 8 devices
  assert f"resumed from {two}/checkpoints/{step}" in out
  resumed = logged_losses(two)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  _assert_same_losses(resumed, one_losses, range(1, STEPS + 1))
