"""What a user can break, end to end through `python -m jaxdistill.main` (issue 18):

  - a workdir that cannot be written (read-only directory; as root, with the capability that
    bypasses file permissions dropped): one `error:` line, exit 2;
  - a disk too small for the run's checkpoints, and a disk that fills during training (a tmpfs
    in a private mount namespace, filled from outside through /proc/<pid>/root): one line naming
    what could not be written and the space the run needs; the checkpoints already written stay
    whole and the rerun resumes from them;
  - --mode=eval on another data seed: the training run's eval.json stays byte-identical, the
    evaluation goes to its own file that records the seed;
  - SIGTERM during start-up and during the final evaluation: one line, exit 0, nothing lost.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, logged_losses, user_env

TINY = ["--config=configs/dual.py:tiny", "--config.train.num_steps=4",
        "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def _main(*args, prefix=(), timeout=600, **kwargs):
  return subprocess.run([*prefix, sys.executable, "-m", "jaxdistill.main", *args], cwd=REPO,
                        env=user_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def _one_error_line(done) -> str:
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
      (done.returncode, done.stderr[-3000:])
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny dual run (4 steps): its workdir."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  done = _main(*TINY, f"--workdir={workdir}")
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


# ------------------------------------------------------------------------- read-only workdir

def _without_permission_override() -> list[str]:
  """A command prefix under which file permissions hold, also for root (whose
  CAP_DAC_OVERRIDE would write into a read-only directory anyway)."""
  if os.geteuid() != 0:
    return []
  setpriv = shutil.which("setpriv")
  if setpriv is None:
    pytest.skip("running as root without util-linux setpriv to drop CAP_DAC_OVERRIDE")
  return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.parametrize("where", ["existing", "below"])
def test_read_only_workdir_is_one_line(tmp_path, where):
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  workdir = read_only if where == "existing" else read_only / "runs" / "new"
  read_only.chmod(0o555)
  try:
    done = _main(*TINY, f"--workdir={workdir}", prefix=_without_permission_override())
  finally:
    read_only.chmod(0o755)
  line = _one_error_line(done)
  assert f"cannot write to --workdir={workdir}" in line and "Permission denied" in line, line
  assert os.listdir(read_only) == []


# ---------------------------------------------------------------------------------- disk full

def _namespaces_work() -> bool:
  try:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


needs_tmpfs = pytest.mark.skipif(not _namespaces_work(),
                                 reason="no unprivileged mount namespace (unshare -rm) for a tmpfs")


def _on_tmpfs(mount, size: str, script: str) -> list[str]:
  """A command that mounts a `size` tmpfs on `mount` in a private mount namespace and runs the
  shell `script` there ($PY: this Python; the mount vanishes with the namespace)."""
  return ["unshare", "-rm", "sh", "-c",
          f'mount -t tmpfs -o size={size} tmpfs "{mount}" && PY="{sys.executable}" && {script}']


@needs_tmpfs
def test_disk_too_small_for_the_checkpoints_fails_before_the_first_step(tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  command = _on_tmpfs(mount, "2m", f'exec "$PY" -m jaxdistill.main {" ".join(TINY)} '
                                   f'--workdir="{mount}/run"')
  done = subprocess.run(command, cwd=REPO, env=user_env(), capture_output=True, text=True,
                        timeout=600)
  line = _one_error_line(done)
  assert "disk full: no room for this run's next 2 checkpoint(s)" in line, line
  assert "free in" in line and "--config.train.max_checkpoints (now 2: the run needs about" in line
  assert "step 1/" not in done.stdout


@needs_tmpfs
def test_disk_filling_during_training_is_one_line_and_the_rerun_resumes(tmp_path):
  """8 MiB tmpfs; a 24-step run checkpointing every 4 steps; once step 9 is logged the test
  fills the disk (from outside the namespace, through /proc/<pid>/root) while checkpoint 8 may
  still be in flight. Then, in the same namespace, the filler is deleted and the run rerun.
  (24 steps: with compiled programs cached the tiny steps take milliseconds, and a 12-step run
  could reach its end before the fill. The first run's stderr is kept off the tmpfs.)"""
  mount = tmp_path / "disk"
  mount.mkdir()
  args = ["--config=configs/dual.py:tiny", "--config.train.num_steps=24",
          "--config.train.checkpoint_every=4", "--config.train.log_every=1"]
  run = f'"$PY" -m jaxdistill.main {" ".join(args)} --workdir="{mount}/run"'
  script = (f'{run} 2> "{tmp_path}/err1"; echo "first=$?"; cat "{tmp_path}/err1"; '
            f'echo "kept=$(ls "{mount}/run/checkpoints" | tr "\\n" " ")"; rm -f "{mount}/filler"; '
            f'{run} > "{mount}/out2" 2>&1; echo "second=$?"; grep -c resumed "{mount}/out2"; '
            f'cat "{mount}/run/metrics.jsonl"')
  proc = subprocess.Popen(_on_tmpfs(mount, "8m", script), cwd=REPO, env=user_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  inside = f"/proc/{proc.pid}/root{mount}"   # the namespace's view of the tmpfs
  deadline = time.time() + 300
  while time.time() < deadline and max(_losses(f"{inside}/run"), default=0) < 9:
    time.sleep(0.05)
  assert proc.poll() is None, proc.stdout.read()
  free = os.statvfs(inside).f_bavail * os.statvfs(inside).f_frsize
  with open(f"{inside}/filler", "wb") as f:
    try:
      os.posix_fallocate(f.fileno(), 0, max(free - 128 * 1024, 1))
    except OSError as e:
      assert e.errno == errno.ENOSPC
  out, _ = proc.communicate(timeout=600)
  first = out.split("first=")[1].splitlines()
  assert first[0] == "2", out
  errors = first[1:first.index(next(line for line in first if line.startswith("kept=")))]
  assert len(errors) == 1 and errors[0].startswith("error: disk full"), out
  assert "max_checkpoints" in errors[0] and "the run needs about" in errors[0], errors[0]
  kept = next(line for line in first if line.startswith("kept=")).split("=")[1].split()
  assert "4" in kept, out   # the complete checkpoint before the fill is still there
  assert "second=0" in out and out.split("second=0")[1].splitlines()[1] == "1", out  # resumed
  steps = [json.loads(line)["step"] for line in out.splitlines() if line.startswith("{")]
  assert steps == list(range(1, 25)), out   # each step logged once across both runs


def _losses(workdir) -> dict:
  try:
    return logged_losses(workdir)
  except (OSError, ValueError):
    return {}


def test_full_disk_errors_name_the_file(tmp_path, monkeypatch):
  """Without a tmpfs: the metrics writer and an atomic write hit ENOSPC (patched) and name their
  file; the checkpointer turns orbax's disk-full error into one DiskFullError."""
  from jaxdistill.atomic import write_json_atomic
  from jaxdistill.store.space import DiskFullError, is_disk_full
  from jaxdistill.train.metrics import MetricsWriter

  class FullFile:
    def write(self, text):
      raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
      raise OSError(errno.ENOSPC, "No space left on device")

  writer = MetricsWriter(str(tmp_path), 0)
  writer.write(1, {"loss": 1.0})
  writer._jsonl = FullFile()
  with pytest.raises(DiskFullError, match=r"cannot append step 2 to .*metrics.jsonl"):
    writer.write(2, {"loss": 2.0})
  writer.close()   # a full disk at close is left to whoever hit it first
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1]

  real_fsync = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
  with pytest.raises(OSError) as e:
    write_json_atomic(str(tmp_path / "eval.json"), {"a": 1})
  monkeypatch.setattr(os, "fsync", real_fsync)
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "eval.json")
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]   # no temporary left
  orbax_error = ValueError("RESOURCE_EXHAUSTED: Error writing ... Failed to write 289733 bytes "
                           "to file 8: No space left on device [os_error_code='28']")
  assert is_disk_full(orbax_error) and not is_disk_full(ValueError("bad shape"))


# ------------------------------------------------------------------- --mode=eval on other data

def test_eval_on_another_seed_keeps_the_training_results(trained):
  before = (trained / "eval.json").read_bytes()
  done = _main(*TINY, f"--workdir={trained}", "--mode=eval", "--config.data.seed=1")
  assert done.returncode == 0, done.stderr[-3000:]
  assert (trained / "eval.json").read_bytes() == before
  written = [p for p in os.listdir(trained) if p.startswith("eval_test_")]
  assert len(written) == 1 and f"results: {trained / written[0]}" in done.stdout
  result = json.loads((trained / written[0]).read_text())
  assert result["settings_differ_from_training"] == {"data.seed": {"training": 0, "evaluated": 1}}
  assert result["provenance"]["data"]["seed"] == 1 and result["split"] == "test"
  assert (trained / f"clip_benchmark_test_{written[0][len('eval_test_'):]}").exists()
  # The same settings again: eval_test.json, beside (never over) the training run's eval.json.
  done = _main(*TINY, f"--workdir={trained}", "--mode=eval")
  assert done.returncode == 0, done.stderr[-3000:]
  assert (trained / "eval.json").read_bytes() == before
  same = json.loads((trained / "eval_test.json").read_text())
  assert "settings_differ_from_training" not in same
  recalls = lambda row: {k: v for k, v in row.items() if not k.endswith("_ms")}   # not timings
  assert recalls(same["dual"]) == recalls(json.loads(before)["dual"])   # same checkpoint and split


# ---------------------------------------------------------------------------------- SIGTERM

def _catches_sigterm(pid: int) -> bool:
  with open(f"/proc/{pid}/status") as f:
    caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
  return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "jaxdistill.main", *TINY, f"--workdir={workdir}"],
                          cwd=REPO, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None and not _catches_sigterm(proc.pid):
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)   # jax is still importing: nothing is built yet
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: --mode=train stopped before it finished; no checkpoint had been written" in out
  assert "Traceback" not in err and "step 1/" not in out


# Runs jaxdistill.main with the final evaluation sending SIGTERM to its own process first.
_TERM_IN_EVAL = """
import os, signal, sys
from absl import app
import jaxdistill.train.loop as loop
evaluate = loop.evaluate_and_report
def evaluate_after_sigterm(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGTERM)
  return evaluate(*args, **kwargs)
loop.evaluate_and_report = evaluate_after_sigterm
from jaxdistill import main
sys.argv = ["jaxdistill.main"] + sys.argv[1:]
app.run(main.main, flags_parser=main._parse_flags)
"""


def test_sigterm_during_the_final_evaluation_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  done = subprocess.run([sys.executable, "-c", _TERM_IN_EVAL, *TINY, f"--workdir={workdir}"],
                        cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (f"SIGTERM: --mode=train stopped before it finished; the latest checkpoint, step 4, "
          f"is in {workdir}/checkpoints") in done.stdout, done.stdout
  assert "Traceback" not in done.stderr and not (workdir / "eval.json").exists()
  done = _main(*TINY, f"--workdir={workdir}")   # the rerun evaluates the saved last step
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from" in done.stdout and json.loads((workdir / "eval.json").read_text())["step"] == 4
