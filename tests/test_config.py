"""Config validation and the command line's one-line errors (all before any compilation)."""

import os
import subprocess
import sys

import pytest

from conftest import recipe_config
from jaxdistill import methods
from jaxdistill.config import ConfigError, suggest_key, validate
from jaxdistill.main import MODES
from jaxdistill.parallel.mesh import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _validate(config, num_devices=8, mode="train"):
  """What jaxdistill.main checks before anything is built: the shared sections, and for
  --mode=train the recipe's own section and the teachers it reads."""
  validate(config, num_devices, mode)
  if mode == "train":
    methods.validate(config)


def _config(**overrides):
  c = recipe_config("loopitr")
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_default_presets_validate():
  for preset in ("tiny", "cpu", "cpu_efficientnet", "scratch", "paper"):
    _validate(recipe_config("loopitr", preset))
  for preset in ("tiny", "paper", "random_itm", "swap", "low_lr", "itm_mean"):
    _validate(recipe_config("loopitr_long", preset))
  for name, presets in (("dual", ("tiny", "cpu")), ("cprd", ("tiny", "cpu", "pretrained")),
                        ("mcad", ("tiny", "cpu", "mobile"))):
    for preset in presets:
      config = recipe_config(name, preset)
      for teacher in config.teachers.values():   # an online teacher must exist: any existing
        teacher.path = REPO                      # path passes validation
      _validate(config)
  for preset in ("tiny", "cpu"):
    _validate(recipe_config("lit_teacher", preset))
  for preset in ("tiny", "dual", "short", "cpu", "towers"):
    _validate(recipe_config("teacher", preset))
  towers = recipe_config("teacher", "towers")   # runs/loopitr_itc: the pretrained towers, ITC only
  assert towers.loopitr.itc_only_steps == towers.train.num_steps == 410
  assert recipe_config("teacher", "cross").init_from[0]["source"] == "workdir:runs/loopitr_itc"
  # MCAD's cpu preset reads those two runs; its student tokenizes as they do, and embeds to the
  # dual teacher's width (eq. 17 dots the two).
  mcad = recipe_config("mcad", "cpu")
  assert (mcad.teachers.dual.path, mcad.teachers.cross.path) == ("runs/loopitr_itc",
                                                                 "runs/cross_positions_s0")
  assert mcad.data.tokenizer == towers.data.tokenizer
  assert mcad.model.embed_dim == towers.model.embed_dim == 128
  # The cross_on_dual preset starts from the :dual run's towers (config.init_from): a source that
  # does not exist stops the run before anything is built, naming the entry and the fix.
  cross = recipe_config("teacher", "cross_on_dual")
  assert cross.init_from[0]["source"] == "workdir:runs/teacher_dual"
  cross.init_from = (dict(cross.init_from[0], source="workdir:/no/such/run"),)
  with pytest.raises(ConfigError, match=r"init_from\[0\] source 'workdir:/no/such/run': "
                                        "/no/such/run does not exist"):
    _validate(cross)
  cross.init_from = (dict(cross.init_from[0], source=f"workdir:{REPO}"),)
  _validate(cross)
  cross.init_from = (dict(cross.init_from[0], source=REPO),)
  with pytest.raises(ConfigError, match="must read workdir:PATH"):
    _validate(cross)


@pytest.mark.parametrize("key,value,needle", [
    ("batch_size", 12, "not divisible by the 8 devices"),
    ("loopitr.num_negatives", 16, "--config.loopitr.num_negatives=16"),
    ("loopitr.num_negatives", 0, "--config.loopitr.num_negatives=0"),
    ("loopitr.teacher", "frozen", "--config.loopitr.teacher='frozen'"),
    ("data.fashion_mnist_dir", "/no/such/dir", "/no/such/dir"),
    ("loopitr.teacher", "offline",
     "--config.teachers.offline.kind=workdir needs --config.teachers.offline.path"),
    ("mesh.fsdp", 3, "--config.mesh.fsdp=3 must divide the 8 devices: use one of [1, 2, 4, 8]"),
    ("mesh.data", 2, "--config.mesh.data * --config.mesh.fsdp = 2 * 1 must equal the 8 devices"),
    ("model.kind", "dual", "--config.model.kind='dual': the LoopITR recipe trains a LoopITR"),
    ("eval.rerank_score", "dual", "--config.eval.rerank_score='dual' is not valid: use one of "
     "cross, cross+dual"),
])
def test_invalid_values_name_the_key(key, value, needle):
  with pytest.raises(ConfigError, match=".*") as info:
    _validate(_config(**{key: value}))
  assert needle in str(info.value)


@pytest.mark.parametrize("mode", list(MODES))
def test_validate_refuses_every_mesh_make_mesh_refuses(mode):
  """validate (before anything is built) and make_mesh (in every mode's run) agree on which
  mesh.data / mesh.fsdp pairs fit 8 devices; a refused pair names the key and the valid values."""
  for data in range(-2, 10):
    for fsdp in range(-1, 10):
      try:
        make_mesh(data, fsdp)
        fits = True
      except ValueError:
        fits = False
      config = _config(**{"mesh.data": data, "mesh.fsdp": fsdp})
      if fits:
        if mode == "train":
          validate(config, 8, mode)
        continue
      with pytest.raises(ConfigError) as info:
        validate(config, 8, mode)
      message = str(info.value)
      if fsdp in (1, 2, 4, 8):
        assert message.startswith("--config.mesh.data * --config.mesh.fsdp = ")
        assert f"set --config.mesh.data={8 // fsdp} (or -1" in message
      else:
        assert message == (f"--config.mesh.fsdp={fsdp} must divide the 8 devices: use one of "
                           "[1, 2, 4, 8]")


def test_suggest_key_finds_typo():
  assert suggest_key(recipe_config("loopitr"), "batch_sise") == "did you mean --config.batch_size?"
  assert "loopitr.num_negatives" in suggest_key(recipe_config("loopitr"), "loopitr.num_negatvies")
  assert "teachers.teacher.path" in suggest_key(recipe_config("cprd"), "teachers.teacher.pth")


def _cli(workdir, *args, config="loopitr"):
  """`python -m jaxdistill.main` on configs/<config>.py:tiny with 8 CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "-m", "jaxdistill.main", f"--config=configs/{config}.py:tiny",
                         f"--workdir={workdir}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


# One process per error (each run stops at its first error); every one must end in one
# `error: ...` line with exit code 2, no traceback and nothing written to the workdir.
@pytest.mark.parametrize("config,args,needle", [
    ("loopitr", ["--config.batch_sise=8"],
     "unknown config key --config.batch_sise: did you mean --config.batch_size?"),
    ("loopitr", ["--config.batch_size=12"], "not divisible by the 8 devices"),
    ("loopitr", ["--config.loopitr.num_negatives=16"], "needs 1 <= m < batch_size=16"),
    ("loopitr", ["--config.data.fashion_mnist_dir=/no/such/dir"],
     "--config.data.fashion_mnist_dir='/no/such/dir'"),
    ("loopitr", ["--config.mesh.fsdp=3"],
     "--config.mesh.fsdp=3 must divide the 8 devices: use one of [1, 2, 4, 8]"),
    ("loopitr", ["--config.mesh.data=3"],
     "--config.mesh.data * --config.mesh.fsdp = 3 * 1 must equal the 8 devices: set "
     "--config.mesh.data=8 (or -1"),
    ("dual", ["--mode=mine"], "--mode=mine needs --config.mining.tower_workdir"),
    ("cprd", ["--mode=cache_teacher", "--config.teachers.teacher.path=/no/such/run"],
     "--config.teachers.teacher.path='/no/such/run' does not exist"),
])
def test_cli_errors_are_one_line(tmp_path, config, args, needle):
  workdir = tmp_path / "run"
  result = _cli(workdir, *args, config=config)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[-1].startswith("error: ") and needle in lines[-1], result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_teacher_section_checked_only_where_a_teacher_is_loaded(tmp_path):
  """config.teachers sections are validated where they are read: --mode=cache_teacher (the
  teacher_cache.teacher section) and online CPRD; an offline CPRD run (scores from the bank) or
  ITC alone needs no teacher."""
  config = recipe_config("cprd")               # teachers.teacher: kind=workdir, path=""
  validate(config, num_devices=8)              # the shared sections read no teacher
  with pytest.raises(ConfigError, match="cprd.distill=cprd needs a frozen teacher: set "
                     "--config.teachers.teacher.kind=workdir --config.teachers.teacher.path"):
    _validate(config)
  with pytest.raises(ConfigError, match="teachers.teacher.kind=workdir needs "
                     "--config.teachers.teacher.path"):
    _validate(config, mode="cache_teacher")
  config.teachers.teacher.path = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="teachers.teacher.path='.*missing' does not exist"):
    _validate(config)
  offline = recipe_config("cprd")              # offline CPRD: the bank, no teacher
  (tmp_path / "meta.json").write_text("{}")
  offline.cprd.bank_dir = str(tmp_path)
  _validate(offline)
  assert methods.recipe_module(offline).teacher_names(offline) == ()
  config.cprd.distill = "none"
  _validate(config)
  config.teachers.teacher.kind = "clip"
  with pytest.raises(ConfigError, match="teachers.teacher.kind='clip'"):
    _validate(config, mode="cache_teacher")
  config.teacher_cache.teacher = ""
  with pytest.raises(ConfigError, match="cache_teacher needs --config.teacher_cache.teacher"):
    _validate(config, mode="cache_teacher")
  config.teacher_cache.teacher = "nobody"
  with pytest.raises(ConfigError, match="--config.teachers.nobody is missing"):
    _validate(config, mode="cache_teacher")


@pytest.mark.parametrize("preset", ["cross_only", "cross_only_mean", "cross_only_mixed",
                                    "cross_only_bert_init", "cross_positions"])
def test_cross_only_probes_need_the_itc_run(preset, tmp_path, monkeypatch):
  """The probes start from runs/loopitr_itc: without it, one error naming the path; with it,
  the preset validates."""
  monkeypatch.chdir(tmp_path)
  config = recipe_config("loopitr_long", preset)
  with pytest.raises(ConfigError, match="runs/loopitr_itc does not exist; train that stage first"):
    _validate(config)
  (tmp_path / "runs" / "loopitr_itc").mkdir(parents=True)
  _validate(config)
