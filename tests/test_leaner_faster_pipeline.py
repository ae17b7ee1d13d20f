"""Leaner-and-Faster's pipeline end to end on the tiny preset (configs/leaner_faster.py:tiny,
train/pipeline.py), as a user runs it: one `python -m jaxdistill.main` command over a random
tiny dual teacher. Checks: each stage's eval.json is kept and a second run skips every stage;
a frozen tower is bit-identical after its stage; each HN index is built from the tower paper 000
names; SIGKILL during stage 2 then the same command finishes with the same losses, every stage
and step, as the uninterrupted run (the stages before stage 2 are copied from that run, so the
kill test costs stage 2 only)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, logged_losses, recipe_config, user_env

pytestmark = pytest.mark.slow
STAGE2_STEPS = 10          # --config.train.num_steps: the tiny preset's stage-2 runs
TRAIN_STAGES = ("teacher_image", "teacher_text", "stage1", "student_image", "student_text")
BEFORE_STAGE2 = ("teacher_image", "teacher_text", "stage1", "mine_teacher")
MINE_STAGES = ("mine_teacher", "mine_student_image")


def make_teacher(path):
  """A random tiny dual teacher with 2 text and 2 image layers (the student takes 1 text layer)."""
  from jaxdistill.teachers.workdir import init_workdir
  c = recipe_config("dual", "tiny")
  c.model.text_layers = c.model.vision_layers = 2
  init_workdir(c, str(path), seed=1)


def command(workdir, teacher):
  return [sys.executable, "-m", "jaxdistill.main", "--config=configs/leaner_faster.py:tiny",
          f"--workdir={workdir}", f"--config.teachers.teacher.path={teacher}",
          f"--config.train.num_steps={STAGE2_STEPS}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(root, workdir, stdout) of one uninterrupted pipeline run."""
  root = tmp_path_factory.mktemp("leaner_faster")
  make_teacher(root / "teacher")
  workdir = root / "reference"
  done = subprocess.run(command(workdir, root / "teacher"), cwd=REPO, env=user_env(),
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return root, workdir, done.stdout


def _params(workdir):
  from jaxdistill.store.run import load_run
  return jax.tree_util.tree_map(np.asarray, load_run(str(workdir)).params)


def _tower(params, side):
  return {k: v for k, v in params.items() if k.startswith(f"{side}_")}


def _assert_identical(a, b, what):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b, what
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert x.dtype == y.dtype and np.array_equal(x, y), f"{what}: {jax.tree_util.keystr(path)}"


def _changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_every_stage_keeps_its_eval_and_a_rerun_skips_them(reference):
  root, workdir, out = reference
  summary = json.loads((workdir / "pipeline.json").read_text())
  assert [s["name"] for s in summary["stages"]] == [
      "teacher_image", "teacher_text", "stage1", "mine_teacher", "student_image",
      "mine_student_image", "student_text"]
  assert summary["provenance"]["config_sha256"] and summary["provenance"]["step"] is None
  steps = {"teacher_image": 4, "teacher_text": 4, "stage1": 6, "student_image": STAGE2_STEPS,
           "student_text": STAGE2_STEPS}
  for name, step in steps.items():
    result = json.loads((workdir / name / "eval.json").read_text())
    assert result["step"] == step and "rsum" in result["dual"], name
    assert sorted(logged_losses(workdir / name)) == list(range(1, step + 1)), name
  again = subprocess.run(command(workdir, root / "teacher"), cwd=REPO, env=user_env(),
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("done, skipped") == 7, again.stdout
  assert "step 1/" not in again.stdout


def test_frozen_towers_are_bit_identical_after_their_stage(reference):
  root, workdir, _ = reference
  teacher = _params(root / "teacher")
  p = {name: _params(workdir / name) for name in TRAIN_STAGES}
  # T -> T': image tower with the text tower fixed, then the reverse (§3.2.2).
  _assert_identical(_tower(p["teacher_image"], "text"), _tower(teacher, "text"), "teacher_image text")
  assert _changed(_tower(p["teacher_image"], "image"), _tower(teacher, "image"))
  _assert_identical(_tower(p["teacher_text"], "image"), _tower(p["teacher_image"], "image"),
                    "teacher_text image")
  assert _changed(_tower(p["teacher_text"], "text"), _tower(p["teacher_image"], "text"))
  # SF: the student's image tower trains beside T''s shared, fixed text tower ...
  _assert_identical(_tower(p["student_image"], "text"), _tower(p["teacher_text"], "text"),
                    "student_image text (T' shared)")
  assert _changed(_tower(p["student_image"], "image"), _tower(p["stage1"], "image"))
  # ... then its text tower with the student image tower fixed.
  _assert_identical(_tower(p["student_text"], "image"), _tower(p["student_image"], "image"),
                    "student_text image")
  assert _changed(_tower(p["student_text"], "text"), _tower(p["stage1"], "text"))


def test_student_text_tower_is_the_teachers_first_layers(reference):
  root, workdir, _ = reference
  from jaxdistill.store.run import load_run_config
  teacher = load_run_config(str(root / "teacher")).model
  for name in ("stage1", "student_text"):
    m = load_run_config(str(workdir / name)).model
    assert (m.text_layers, m.text_width, m.embed_dim) == (1, teacher.text_width, teacher.embed_dim)
  m = load_run_config(str(workdir / "student_image")).model
  assert m.text_layers == teacher.text_layers == 2
  assert "layer_1" not in _params(workdir / "stage1")["text_encoder"]["encoder"]
  log = "init_from workdir:" + str(root / "teacher") + " (step 1): 22 params"
  assert log in reference[2]   # stage 1: token + position embeddings, layer_0, final LN, projection


def _embeddings(run_dir, side):
  """The train split embedded by one tower of the run in `run_dir`, as mining reads it."""
  from jaxdistill.data.benchmark import prepare_benchmark
  from jaxdistill.data.compositional import normalize_images
  from jaxdistill.store.run import load_run
  run = load_run(str(run_dir))
  bench = prepare_benchmark(run.config, str(run_dir))
  if side == "image":
    return np.asarray(run.towers.embed_image(run.params, normalize_images(
        bench.splits["train"].images))[0])
  ids, mask = bench.tokens["train"]
  return np.asarray(run.towers.embed_text(run.params, ids.reshape(-1, ids.shape[-1]),
                                          mask.reshape(-1, ids.shape[-1]))[0])


def test_hard_negative_index_of_each_stage_is_built_from_the_named_tower(reference):
  """§3.2.2: while f_v^S trains, the texts are indexed with the fine-tuned teacher's text tower;
  while f_t^S trains, the images with the trained student image tower."""
  _, workdir, _ = reference
  mine_json = {n: json.loads((workdir / n / "mining" / "mine.json").read_text()) for n in MINE_STAGES}
  assert mine_json["mine_teacher"]["tower_workdir"] == str(workdir / "teacher_text")
  assert mine_json["mine_student_image"]["tower_workdir"] == str(workdir / "student_image")
  origin = mine_json["mine_student_image"]["provenance"]   # the tower's checkpoint it embedded with
  assert origin["checkpoint"] == str(workdir / "student_image" / "checkpoints" / str(origin["step"]))
  captions = np.load(workdir / "mine_teacher" / "mining" / "captions.npy")
  np.testing.assert_allclose(captions, _embeddings(workdir / "teacher_text", "text"), atol=1e-5)
  images = np.load(workdir / "mine_student_image" / "mining" / "images.npy")
  np.testing.assert_allclose(images, _embeddings(workdir / "student_image", "image"), atol=1e-5)
  assert not np.allclose(images, _embeddings(workdir / "teacher_text", "image"), atol=1e-3)
  # and each student stage trains with the bank mined for it
  from jaxdistill.store.run import load_run_config
  for stage, bank in (("student_image", "mine_teacher"), ("student_text", "mine_student_image")):
    c = load_run_config(str(workdir / stage))
    assert c.mining.bank_dir == str(workdir / bank / "bank") and c.leaner_faster.hard_negatives == 2
    assert c.leaner_faster.tower == stage.split("_")[1]
  metrics = json.loads((workdir / "student_image" / "metrics.jsonl").read_text().splitlines()[0])
  assert "hn_v2t" in metrics and "hn_t2v" not in metrics and metrics["hn_valid_v2t"] > 0.5
  metrics = json.loads((workdir / "student_text" / "metrics.jsonl").read_text().splitlines()[0])
  assert "hn_t2v" in metrics and "hn_v2t" not in metrics


def test_sigkill_during_stage_2_then_same_command_gives_the_same_losses(reference):
  root, ref_workdir, _ = reference
  workdir = root / "killed"
  for name in BEFORE_STAGE2:   # what the command would redo bit for bit; it skips them
    shutil.copytree(ref_workdir / name, workdir / name)
  proc = subprocess.Popen(command(workdir, root / "teacher"), cwd=REPO, env=user_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  checkpoints = workdir / "student_image" / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:   # a finished checkpoint of stage 2
    if checkpoints.exists() and any(d.isdigit() for d in os.listdir(checkpoints)):
      break
    time.sleep(0.01)
  assert proc.poll() is None, proc.stdout.read()[-3000:]
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(logged_losses(workdir / "student_image"), default=0)
  saved = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert killed_at < STAGE2_STEPS and not (workdir / "student_image" / "eval.json").exists(), \
      f"the kill came after stage 2's last step ({killed_at}); the test needs it mid-stage"
  finish = subprocess.run(command(workdir, root / "teacher"), cwd=REPO, env=user_env(),
                          capture_output=True, text=True, timeout=900)
  assert finish.returncode == 0, finish.stdout[-3000:] + finish.stderr[-3000:]
  assert finish.stdout.count("done, skipped") == 4, finish.stdout     # the stages before it
  assert f"resumed from {checkpoints}/{saved}" in finish.stdout
  for name in ("student_image", "student_text"):
    expected, got = logged_losses(ref_workdir / name), logged_losses(workdir / name)
    assert sorted(got) == sorted(expected), name
    for step in expected:
      assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (name, step)
    assert (workdir / name / "eval.json").exists()
