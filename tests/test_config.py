"""Config validation and the command line's one-line errors (all before any compilation)."""

import os
import subprocess
import sys

import pytest

from jaxdistill.config import ConfigError, suggest_key, validate

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from configs import loopitr  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = loopitr.get_config("tiny")
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_default_presets_validate():
  for preset in ("tiny", "cpu"):
    validate(loopitr.get_config(preset), num_devices=8)
  validate(loopitr.get_config("paper"), num_devices=8)
  from configs import teacher
  for preset in ("tiny", "dual", "short", "cpu"):
    validate(teacher.get_config(preset), num_devices=8)
  cross = teacher.get_config("cross")              # starts from the :dual run's towers
  cross.loopitr.init_towers_from = "/no/such/run"
  with pytest.raises(ConfigError, match="init_towers_from='/no/such/run' holds no checkpoints"):
    validate(cross, num_devices=8)


@pytest.mark.parametrize("key,value,needle", [
    ("batch_size", 12, "not divisible by the 8 devices"),
    ("loopitr.num_negatives", 16, "--config.loopitr.num_negatives=16"),
    ("loopitr.num_negatives", 0, "--config.loopitr.num_negatives=0"),
    ("loopitr.teacher", "frozen", "--config.loopitr.teacher='frozen'"),
    ("data.fashion_mnist_dir", "/no/such/dir", "/no/such/dir"),
    ("loopitr.teacher", "offline", "--config.loopitr.offline_workdir"),
])
def test_invalid_values_name_the_key(key, value, needle):
  with pytest.raises(ConfigError, match=".*") as info:
    validate(_config(**{key: value}), num_devices=8)
  assert needle in str(info.value)


def test_suggest_key_finds_typo():
  assert suggest_key(loopitr.get_config("tiny"), "batch_sise") == "did you mean --config.batch_size?"
  assert "loopitr.num_negatives" in suggest_key(loopitr.get_config("tiny"), "loopitr.num_negatvies")


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxdistill.main", "--config=configs/loopitr.py:tiny",
                         "--workdir=/tmp/jaxdistill-unused", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--config.batch_sise=8"], "unknown config key --config.batch_sise: did you mean --config.batch_size?"),
    (["--config.batch_size=12"], "not divisible by the 8 devices"),
    (["--config.loopitr.num_negatives=16"], "needs 1 <= m < batch_size=16"),
    (["--config.data.fashion_mnist_dir=/no/such/dir"], "--config.data.fashion_mnist_dir='/no/such/dir'"),
])
def test_cli_errors_are_one_line(args, needle):
  result = _cli(*args)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("error: ") and needle in lines[-1], result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists("/tmp/jaxdistill-unused/checkpoints")


def test_teacher_section_checked_only_where_a_teacher_is_loaded():
  """The teacher section is validated for --mode=cache_teacher and online CPRD; an offline CPRD
  run (scores from the bank) or ITC alone needs no teacher."""
  from configs import cprd
  config = cprd.get_config("tiny")            # teacher.kind=workdir, teacher.path=""
  with pytest.raises(ConfigError, match="teacher.kind=workdir needs --config.teacher.path"):
    validate(config, num_devices=8)
  with pytest.raises(ConfigError, match="teacher.path"):
    validate(config, num_devices=8, mode="cache_teacher")
  config.cprd.distill = "none"
  validate(config, num_devices=8)
  config.teacher.kind = "clip"
  with pytest.raises(ConfigError, match="teacher.kind='clip'"):
    validate(config, num_devices=8, mode="cache_teacher")
