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
Every config problem is reported in one line, before anything is compiled.
"""

from __future__ import annotations

import importlib
import sys

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


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


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
  from jaxdistill.config import validate
  from jaxdistill.errors import JaxDistillError
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=configs/loopitr.py")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=runs/loopitr")
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    validate(config, jax.device_count(), _MODE.value)
    if _MODE.value == "train":
      from jaxdistill import methods
      methods.validate(config)
    from jaxdistill.data.fashion_mnist import validate_fashion_mnist_dir
    if config.data.get("name", "fashion_grid") == "fashion_grid":
      validate_fashion_mnist_dir(config.data.fashion_mnist_dir or None)
    module_name, function_name = MODES[_MODE.value].split(":")
    run = getattr(importlib.import_module(module_name), function_name)
    run(config, _WORKDIR.value)
  except (JaxDistillError, FileNotFoundError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
