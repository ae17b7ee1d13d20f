"""Command line: `python -m jaxdistill.main --config=configs/loopitr.py --workdir=runs/loopitr`.

Modes (`--mode`, each a `run(config, workdir)` function named in `MODES`):
  train          (default) train, resuming from the workdir's latest checkpoint; evaluate at the end
  eval           re-evaluate the workdir's latest checkpoint
  cache_teacher  run the config's teacher over the dataset once; store its features (teachers/cache.py)
  mine           embed the corpus, build a ScaNN index and a hard-negative bank (mining/run.py)
  export         write the student's towers as TFLite models into <workdir>/export (export/run.py)
  pretrain_image self-supervised pretraining of an image-only network (DINO, configs/ssl_vit.py),
                 then a linear probe into <workdir>/probe.json (train/pretrain.py)
Config overrides use ml_collections syntax, e.g. `--config.batch_size=64 --config.loopitr.num_negatives=1`.
Every config problem is reported in one line, before anything is compiled; so are a workdir that
cannot be written and a full disk (exit 2). SIGTERM at any point exits 0 with one line saying what
was saved (in the training loop: the current step is checkpointed first, train/loop.py).
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file, e.g. configs/loopitr.py[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval.json, tokenizer.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU pods, SLURM, "
    "several local processes; coordinator from the environment, see launch/).")

# mode -> "module:function"; the function takes (config, workdir). Imported only when chosen.
MODES = {
    "train": "jaxdistill.methods:train",
    "eval": "jaxdistill.train.loop:evaluate_workdir",
    "cache_teacher": "jaxdistill.teachers.cache:run",
    "mine": "jaxdistill.mining.run:run",
    "export": "jaxdistill.export.run:run",
    "pretrain_image": "jaxdistill.methods:pretrain_image",
}
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to do with the workdir.")


def _fail(message: str, *, now: bool = False) -> None:
  """Prints `error: message` and exits 2; now: without running exit handlers (after a full disk,
  library threads and atexit hooks would each print a traceback of their failed flushes)."""
  print(f"error: {message}", file=sys.stderr)
  if now:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
  sys.exit(2)


def _exit_on_sigterm(mode: str, workdir: str):
  """The SIGTERM handler outside the training loop (which polls its own flag and checkpoints
  first, train/loop.py): one line naming the latest checkpoint, then exit 0 at once. Files are
  written under a temporary name and renamed, so one being written stays untouched; exit
  handlers are skipped (raising instead, inside an import or a compile, can crash the
  interpreter's shutdown)."""
  def handler(signum, frame):
    print(_terminated_message(mode, workdir), flush=True)
    sys.stderr.flush()
    os._exit(0)
  return handler


def _latest_checkpoint(workdir: str) -> int | None:
  """The newest complete checkpoint step under <workdir>/checkpoints (orbax's temporary
  directories of an unfinished save carry a suffix), without opening orbax."""
  try:
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


def _terminated_message(mode: str, workdir: str) -> str:
  latest = _latest_checkpoint(workdir)
  saved = (f"the latest checkpoint, step {latest}, is in {workdir}/checkpoints" if latest is not None
           else "no checkpoint had been written")
  return (f"SIGTERM: --mode={mode} stopped before it finished; {saved}; files are written whole "
          "or not at all, so rerun the same command to resume")


def _require_writable(workdir: str) -> None:
  """One line, before anything is built, when `workdir` (or, while it does not exist yet, the
  directory it would be created in) cannot be written. Creates nothing."""
  probe_dir = os.path.abspath(workdir)
  while not os.path.isdir(probe_dir) and os.path.dirname(probe_dir) != probe_dir:
    probe_dir = os.path.dirname(probe_dir)
  try:
    if os.path.exists(os.path.abspath(workdir)) and not os.path.isdir(workdir):
      raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", workdir)
    fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".jaxdistill-write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    _fail(f"cannot write to --workdir={workdir} ({e.strerror}): choose a directory you can write, "
          "e.g. --workdir=$HOME/runs/<name>")


def _load_config_file(argv: list[str]):
  """The config named by --config=PATH[:preset], loaded without applying overrides."""
  from jaxdistill.config import load_config_file
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  return None if spec is None else load_config_file(spec)


def _unknown_override(config, argv: list[str]) -> str | None:
  """The first --config.KEY override whose KEY is not in the config, with a suggestion."""
  from jaxdistill.config import suggest_key
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    node = config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        return f"unknown config key --config.{key}: {suggest_key(config, key)}"
      node = node[part]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a bad --config file or override into one clear line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - any parse failure becomes one line, not a traceback
    try:
      config = _load_config_file(argv)
    except Exception as load_error:  # noqa: BLE001
      _fail(f"cannot load --config: {load_error}")
    message = _unknown_override(config, argv) if config is not None else None
    _fail(message or str(e).replace("\\n", " ").strip("'\" "))
  return []


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)   # keep orbax's per-save INFO lines out of the progress
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=configs/loopitr.py")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=runs/loopitr")
  signal.signal(signal.SIGTERM, _exit_on_sigterm(_MODE.value, _WORKDIR.value))
  _run(config, _WORKDIR.value, _MODE.value)


def initialize_distributed(environ=os.environ) -> None:
  """jax.distributed.initialize() for --distributed. With JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID set (launch/local_multiprocess.sh, any hand-made cluster)
  they are passed explicitly; otherwise jax detects the cluster itself (TPU VM slices, SLURM,
  Open MPI). On CPU the processes talk through gloo (jax's default CPU collectives)."""
  import jax
  if environ.get("JAX_NUM_PROCESSES") or environ.get("JAX_PROCESS_ID"):
    if not (environ.get("JAX_COORDINATOR_ADDRESS") and environ.get("JAX_NUM_PROCESSES")
            and environ.get("JAX_PROCESS_ID")):
      _fail("--distributed with an explicit coordinator needs all three of "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (launch/)")
    jax.distributed.initialize(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(environ["JAX_NUM_PROCESSES"]),
                               process_id=int(environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def _run(config, workdir: str, mode: str) -> None:
  from jaxdistill.config import validate
  from jaxdistill.errors import JaxDistillError
  from jaxdistill.store.checkpoint import quiet_failed_save_noise
  from jaxdistill.store.space import DiskFullError
  quiet_failed_save_noise(logging.get_absl_logger())
  import jax
  if _DISTRIBUTED.value:
    initialize_distributed()
  try:
    validate(config, jax.device_count(), mode)
    if mode == "train":
      from jaxdistill import methods
      methods.validate(config)
    from jaxdistill.data.fashion_mnist import validate_fashion_mnist_dir
    if config.data.get("name", "fashion_grid") == "fashion_grid":
      validate_fashion_mnist_dir(config.data.fashion_mnist_dir or None)
    _require_writable(workdir)
    module_name, function_name = MODES[mode].split(":")
    run = getattr(importlib.import_module(module_name), function_name)
    run(config, workdir)
  except DiskFullError as e:
    _fail(str(e), now=True)
  except (JaxDistillError, FileNotFoundError) as e:
    _fail(str(e))
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    _fail(f"disk full: cannot write {e.filename or 'a file'} under --workdir={workdir}: free some "
          "space or choose another --workdir, then rerun the same command (it resumes from the "
          "last checkpoint)", now=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
