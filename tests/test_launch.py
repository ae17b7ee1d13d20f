"""launch/tpu_vm.sh, launch/gke_xpk.sh, launch/slurm_gpu.sbatch: DRY_RUN=1 prints, shell-quoted,
the commands each would run and runs none; without it the same commands run with the same argv
(fake gcloud / xpk / srun on PATH log theirs; the fakes also run the remote script of `gcloud ...
ssh --command` and the container command of `xpk --command` with bash, so the overrides are checked
through those inner shells too). No network or cloud tools; well under a second."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG, GCS, SHARED = ("configs/clip_distill.py:v5e-256", "gs://bucket/runs/clip_distill",
                       "/shared/runs/clip_distill")
# The docs/scaling.md levers, plus one override with a space, both quotes and shell syntax.
OVERRIDES = ["--config.mesh.fsdp=16", "--config.model.remat=full", "--config.model.dtype=bfloat16",
             "--config.train.accum_steps=1", "--config.data.image_root=/data/it's \"a b\";$HOME`x`"]

LOG = '{ printf "%s\\0" "${0##*/}" "$@"; printf "\\n"; } >> "$FAKE_LOG"\n'
# Runs the value of --command with bash (in $HOME for gcloud ... ssh, as on a TPU VM worker).
RUN_COMMAND = 'while (($#)); do [[ $1 == --command ]] && { cd %s; exec bash -c "$2"; }; shift; done'
FAKES = {"gcloud": LOG + f"if [[ $4 == ssh ]]; then {RUN_COMMAND % '~'}; fi\n",
         "xpk": LOG + RUN_COMMAND % "." + "\n", "srun": LOG, "python": LOG}


def _write_exe(path, body: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


@pytest.fixture
def env(tmp_path):
  fake_bin, home = tmp_path / "bin", tmp_path / "home"
  for name, body in FAKES.items():
    _write_exe(fake_bin / name, body)
  for name in ("python", "pip"):   # the venv tpu_vm.sh's remote script finds on the worker
    _write_exe(home / "jaxdistill" / ".venv" / "bin" / name, LOG)
  return dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", HOME=str(home),
              FAKE_LOG=str(tmp_path / "calls.log"))


def _run(env, script: str, *args: str, dry: bool):
  env = dict(env)
  env.pop("DRY_RUN", None)
  if dry:
    env["DRY_RUN"] = "1"
  proc = subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=30)
  calls = []
  if os.path.exists(env["FAKE_LOG"]):
    with open(env["FAKE_LOG"]) as f:
      calls = [record.split("\0") for record in f.read().split("\0\n")[:-1]]
  return proc, calls


def _dry_and_real(env, script: str, *args: str):
  """Both runs; asserts the dry one runs nothing. Returns (printed argvs, logged calls)."""
  proc, calls = _run(env, script, *args, dry=True)
  assert proc.returncode == 0, proc.stderr
  assert calls == [], "DRY_RUN=1 ran something"
  printed = [shlex.split(line) for line in proc.stdout.splitlines()]
  proc, calls = _run(env, script, *args, dry=False)
  assert proc.returncode == 0, proc.stderr
  return printed, calls


def _commands(script: str):
  """The argvs of a `;`-separated shell script (quoted `;` stay inside their words)."""
  lexer = shlex.shlex(script, posix=True, punctuation_chars=";")
  lexer.whitespace_split = True
  commands = [[]]
  for token in lexer:
    if token == ";":
      commands.append([])
    else:
      commands[-1].append(token)
  return commands


def _train(python: str, workdir: str):
  return [python, "-m", "jaxdistill.main", "--distributed", f"--config={CONFIG}",
          f"--workdir={workdir}", *OVERRIDES]


def _option(argv, flag: str) -> str:
  assert argv.count(flag) == 1, argv
  return argv[argv.index(flag) + 1]


def test_tpu_vm(env):
  printed, calls = _dry_and_real(env, "tpu_vm.sh", "my-v5p", "us-east5-a", CONFIG, GCS, *OVERRIDES)
  scp, ssh = printed
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in scp and scp[-1] == "my-v5p:~/jaxdistill/"
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p"]
  assert "--worker=all" in ssh and _option(ssh, "--zone") == "us-east5-a"
  remote = _commands(_option(ssh, "--command"))
  assert [".venv/bin/pip", "install", "-q", "-c", "constraints.txt", "-e", ".[tpu]"] in remote
  assert remote[-1] == _train(".venv/bin/python", GCS)
  # The real run: gcloud got what was printed, and the remote script ran pip, then the trainer.
  assert calls == [scp, ssh, ["pip", *remote[-2][1:]], ["python", *remote[-1][1:]]]


def test_gke_xpk(env):
  printed, calls = _dry_and_real(env, "gke_xpk.sh", "my-cluster", "loopitr-paper", "v5litepod-256",
                                 "2", "gcr.io/proj/jaxdistill:latest", CONFIG, GCS, *OVERRIDES)
  [xpk] = printed
  assert xpk[:3] == ["xpk", "workload", "create"]
  assert _option(xpk, "--cluster") == "my-cluster"
  assert _option(xpk, "--workload") == "loopitr-paper"
  assert _option(xpk, "--tpu-type") == "v5litepod-256"
  assert _option(xpk, "--num-slices") == "2"
  assert _option(xpk, "--docker-image") == "gcr.io/proj/jaxdistill:latest"
  command = _option(xpk, "--command")
  assert "install" not in command   # the image has everything
  assert _commands(command) == [_train("python", GCS)]
  assert calls == [xpk, _train("python", GCS)]


def test_slurm_gpu(env):
  printed, calls = _dry_and_real(env, "slurm_gpu.sbatch", CONFIG, SHARED, *OVERRIDES)
  assert printed == [["srun", *_train(".venv/bin/python", SHARED)]]
  assert calls == printed


@pytest.mark.parametrize("script,nargs", [("tpu_vm.sh", 4), ("gke_xpk.sh", 7),
                                          ("slurm_gpu.sbatch", 2)])
@pytest.mark.parametrize("dry", [False, True])
def test_usage_error(env, script, nargs, dry):
  proc, calls = _run(env, script, *["x"] * (nargs - 1), dry=dry)
  assert proc.returncode == 2 and proc.stdout == "" and calls == []
  assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("usage: "), proc.stderr


@pytest.mark.parametrize("slice_name,devices", [("v5e-256", 256), ("h100x64", 64)])
def test_clip_distill_is_the_run_docs_scaling_models(slice_name, devices):
  """configs/clip_distill.py (what the launch examples start): the step benchmarks/scaling.py
  compiles, with levers that fit the slice's devices."""
  from jaxdistill.config import ConfigError, load_config_file
  c = load_config_file(os.path.join(REPO, "configs", f"clip_distill.py:{slice_name}"))
  assert (c.method, c.batch_size, c.leaner_faster.stage) == ("leaner_faster", 32_768, "stage2")
  assert devices % c.mesh.fsdp == 0 and c.batch_size % devices == 0
  assert (c.batch_size // devices) % c.train.accum_steps == 0
  assert c.model.embed_dim == 768 and (c.model.image_size, c.model.patch_size) == (224, 16)
  assert c.teachers.teacher.kind == "pretrained" and c.teachers.teacher.dtype == "bfloat16"
  assert c.data.tokenizer == os.path.join(c.teachers.teacher.path, "tokenizer.json")
  with pytest.raises(ConfigError, match="v5e-256, h100x64"):
    load_config_file(os.path.join(REPO, "configs", "clip_distill.py:v4-8"))


def test_scaling_models_clip_distill_with_an_abstract_clip_l14_teacher():
  """benchmarks/scaling.py compiles configs/clip_distill.py with each row's levers and CLIP
  ViT-L/14's architecture as the teacher (abstract params: 427.6M, bfloat16; nothing read)."""
  import jax
  import numpy as np
  from benchmarks import scaling
  teacher = scaling.abstract_clip_teacher("bfloat16")
  leaves = jax.tree.leaves(teacher.params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == np.dtype("bfloat16")
             for x in leaves)
  assert abs(sum(int(np.prod(x.shape)) for x in leaves) - 427_616_513) < 1_000_000
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
  assert jax.eval_shape(teacher.embed_images, teacher.params, images).shape == (2, 768)
  c = scaling.step_config("h100x64", 64, "dots", "float32", 4)
  assert (c.mesh.fsdp, c.model.remat, c.model.dtype, c.train.accum_steps) == (64, "dots", "float32", 4)
  assert c.method == "leaner_faster" and c.batch_size == 32_768
