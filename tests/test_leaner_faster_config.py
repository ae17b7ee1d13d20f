"""Leaner-and-Faster as configuration: the Table 2 rows as stage lists (configs/leaner_faster.py),
one-line errors naming the stage key and the fix (train/pipeline.py validate_pipeline), a stage's
run config (networks, sources, banks), the stage recipe's losses against losses/leaner_faster.py
(methods/leaner_faster.py), and the unpaired stage-1 pool's disjointness from stage 2's data
(data/unpaired.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, loss_and_grads, one_device_mesh, recipe_config
from jaxdistill import methods
from jaxdistill.config import ConfigError, validate
from jaxdistill.train import pipeline


@pytest.fixture
def teacher_dir(tmp_path):
  """A directory holding only the config.json of a tiny dual teacher with 2 text layers (all
  that validation and stage configs read of it)."""
  c = recipe_config("dual", "tiny")
  c.model.text_layers = 2
  c.model.text_width = 48
  c.model.embed_dim = 24
  (tmp_path / "teacher").mkdir()
  (tmp_path / "teacher" / "config.json").write_text(c.to_json_best_effort())
  return tmp_path / "teacher"


def lf_config(teacher_dir, arg="tiny"):
  c = recipe_config("leaner_faster", arg)
  c.teachers.teacher.path = str(teacher_dir)
  return c


def _validate(c):
  validate(c, 8, "train")
  methods.validate(c)


# ------------------------------------------------------------------------ Table 2 as stage lists

def _names(c):
  return [s["name"] for s in c.pipeline.stages]


def test_every_table_2_row_is_a_valid_stage_list(teacher_dir):
  full = ["teacher_image", "teacher_text", "stage1", "mine_teacher", "student_image",
          "mine_student_image", "student_text"]
  for ablation in ("full", "wo_stage1", "stage1_mse", "stage1_infonce", "wo_sf", "wo_kd",
                   "wo_hn", "wo_kd_hn"):
    c = lf_config(teacher_dir, f"tiny,{ablation}")
    _validate(c)
    assert c.pipeline.ablation == ablation
    stages = {s["name"]: s for s in c.pipeline.stages}
    names = _names(c)
    if ablation in ("full", "stage1_mse", "stage1_infonce", "wo_kd"):
      assert names == full, ablation
    if ablation in ("stage1_mse", "stage1_infonce"):
      assert stages["stage1"]["settings"]["leaner_faster.stage1_loss"] == ablation[7:]
    if ablation == "wo_stage1":
      assert "stage1" not in names
      assert [e["source"] for e in stages["student_image"]["init_from"]] == ["stage:teacher_text"]
      assert stages["student_text"]["init_from"][1]["layers"] == "first:1"
    if ablation == "wo_sf":
      assert names[-1] == "student" and "student_image" not in names
      assert stages["student"]["settings"]["leaner_faster.tower"] == "both"
      assert stages["student"]["trainable"] == ((".*", {}),)
    kd_off = ablation in ("wo_kd", "wo_kd_hn")
    hn_off = ablation in ("wo_hn", "wo_kd_hn")
    for s in c.pipeline.stages:
      if s.get("settings", {}).get("leaner_faster.stage") == "stage2":
        assert (s["settings"].get("leaner_faster.kl_weight") == 0.0) == kd_off, (ablation, s["name"])
        assert (s["settings"].get("leaner_faster.contrastive_weight") == 0.0) == kd_off
        assert bool(s["bank"]) != hn_off, (ablation, s["name"])
    assert any(s["kind"] == "mine" for s in c.pipeline.stages) != hn_off
  direct = lf_config(teacher_dir, "cpu,direct")   # Table 1's baseline: InfoNCE in both stages
  _validate(direct)
  infonce = {s["name"]: s for s in lf_config(teacher_dir, "cpu,stage1_infonce").pipeline.stages}
  assert _names(direct) == ["stage1", "student"]
  assert direct.pipeline.stages[0] == infonce["stage1"]
  student = direct.pipeline.stages[1]
  assert student["method"] == "dual" and "teachers" not in student and "bank" not in student
  assert student["steps"] == 2 * infonce["student_text"]["steps"]
  with pytest.raises(ValueError, match="'wo_foo' is not a preset"):
    recipe_config("leaner_faster", "tiny,wo_foo")
  assert recipe_config("leaner_faster", "cpu,minilm").teachers.teacher.path == "runs/teacher_dual_minilm"
  assert recipe_config("leaner_faster", "cpu,minilm").pipeline.student_text_layers == 3
  assert recipe_config("leaner_faster", "cpu,text_layers=0").pipeline.stages[2]["init_from"] == ()


# ------------------------------------------------------------------------ bad stage configs

def _mutate(c, index, **fields):
  stages = [dict(s) for s in c.pipeline.stages]
  for key, value in fields.items():
    if value is None:
      del stages[index][key]
    else:
      stages[index][key] = value
  c.pipeline.stages = tuple(stages)
  return c


BAD = [
    (dict(index=0, kind="evaluate"), r"--config.pipeline.stages\[0\].kind='evaluate' is not valid: "
     "use one of train, mine"),
    (dict(index=2, steps_per_epoch=3), r"stages\[2\].steps_per_epoch is not a key of a train "
     "stage: use only name, kind, method"),
    (dict(index=2, trainable=None), r"stages\[2\] \(stage1\) lacks 'trainable'"),
    (dict(index=1, name="teacher_image"), r"stages\[1\].name='teacher_image' must be a unique "
     "directory name"),
    (dict(index=0, init_from=({"source": "stage:student_text",
                               "mapping": (("student/", "student/"),)},)),
     r"stages\[0\].init_from\[0\].source='stage:student_text' names no earlier train stage: use "
     r"stage:NAME with NAME one of \(none yet: reorder the stages\)"),
    (dict(index=4, bank="stage:teacher_text"), r"stages\[4\].bank='stage:teacher_text' names no "
     r"earlier mine stage: use stage:NAME with NAME one of \['mine_teacher'\]"),
    (dict(index=3, tower="teacher:teacher"), r"stages\[3\].tower='teacher:teacher' must read "
     "stage:NAME"),
    (dict(index=2, teachers={"teacher": "teacher:nobody"}), r"stages\[2\].teachers.teacher="
     r"'teacher:nobody': config.teachers has no section 'nobody'"),
    (dict(index=2, settings={"leaner_faster.kl_wieght": 0.0}), r"stages\[2\].settings sets unknown "
     "key 'leaner_faster.kl_wieght': did you mean leaner_faster.kl_weight\\?"),
    (dict(index=2, method="leaner"), r"stages\[2\].method='leaner' has no recipe: use one of"),
    (dict(index=2, model="small"), r"stages\[2\].model='small' is not valid: use one of student, "
     "teacher, student_image\\+teacher_text"),
    (dict(index=2, data="coco"), r"stages\[2\].data='coco' is not valid: use one of train, unpaired"),
    (dict(index=2, steps=-1), r"stages\[2\].steps=-1 must be an int >= 0"),
    (dict(index=2, trainable=((".*",),)), r"stages\[2\].trainable=.* must be \(\(regex, None"),
    (dict(index=2, init_from=({"source": "stage:teacher_text"},)),
     r"stages\[2\].init_from\[0\] needs a mapping"),
    (dict(index=2, init_from=({"source": "runs/x", "mapping": (("a", "b"),)},)),
     r"stages\[2\].init_from\[0\].source='runs/x' must read stage:NAME, teacher:NAME, workdir:PATH"),
]


@pytest.mark.parametrize("mutation,needle", BAD)
def test_bad_stage_config_names_the_key_and_the_fix(teacher_dir, mutation, needle):
  c = _mutate(lf_config(teacher_dir), **mutation)
  with pytest.raises(ConfigError, match=needle):
    _validate(c)


def test_pipeline_level_errors(teacher_dir, tmp_path):
  c = lf_config(teacher_dir)
  c.pipeline.student_text_layers = 3
  with pytest.raises(ConfigError, match=r"student_text_layers=3 exceeds the teacher's 2 text "
                     r"layers: use at most 2 \(0: the student's own text tower"):
    _validate(c)
  c = lf_config(teacher_dir)
  c.pipeline.stages = ()
  with pytest.raises(ConfigError, match="--config.pipeline.stages is empty"):
    _validate(c)
  c = lf_config(tmp_path / "missing")
  with pytest.raises(ConfigError, match="--config.teachers.teacher.path='.*missing' does not exist"):
    _validate(c)
  loopitr = tmp_path / "loopitr"
  loopitr.mkdir()
  (loopitr / "config.json").write_text(recipe_config("loopitr", "tiny").to_json_best_effort())
  with pytest.raises(ConfigError, match="is a loopitr run: the pipeline's teacher must be a dual "
                     "encoder"):
    _validate(lf_config(loopitr))


def test_a_workdir_of_another_pipeline_config_is_refused(teacher_dir, tmp_path):
  """Done stages are skipped by their files alone: a changed config must not reuse them."""
  def no_run(*args):
    raise AssertionError("no stage may run")
  work = tmp_path / "run"
  work.mkdir()
  c = lf_config(teacher_dir)
  (work / pipeline.CONFIG_FILE).write_text(c.to_json_best_effort())
  c.pipeline.stages[0]["steps"] = 7
  with pytest.raises(ConfigError, match=r"holds a pipeline run with another config .*"
                     r"pipeline\.stages.*new --workdir"):
    pipeline.run_pipeline(c, str(work), no_run, no_run, methods.RECIPES)


def _fake_done_pipeline(c, work):
  """`work` as a finished run of config c: its config file, each train stage's eval.json at
  its last step, each mine stage's mine.json and banks (all that stage_done reads)."""
  work.mkdir()
  (work / pipeline.CONFIG_FILE).write_text(c.to_json_best_effort())
  for stage in c.pipeline.stages:
    d = work / stage["name"]
    if stage["kind"] == "mine":
      for folder, name in (("mining", "mine.json"), ("bank", pipeline.I2T_FILE),
                           ("bank", pipeline.T2I_FILE)):
        (d / folder).mkdir(parents=True, exist_ok=True)
        (d / folder / name).write_text("{}")
    else:
      d.mkdir()
      steps = stage.get("steps", 0) or c.train.num_steps
      (d / "eval.json").write_text(json.dumps({"step": steps, "dual": {"rsum": 1.0}}))


def _reused(c, other_dir, workdir="row"):
  other = pipeline.reused_pipeline(json.loads(c.to_json_best_effort()), str(other_dir))
  reused = set()
  for i, stage in enumerate(c.pipeline.stages):
    if pipeline.reusable(c, i, other, str(other_dir), reused, workdir):
      reused.add(stage["name"])
  return reused


def test_reuse_takes_a_stage_only_when_it_and_all_it_reads_are_the_same(teacher_dir, tmp_path):
  """Table 2's rows share the full row's first stages: a stage is copied when a stage of the same
  run config is done there and every stage it reads was copied too (so its inputs are the same)."""
  other = tmp_path / "full"
  _fake_done_pipeline(lf_config(teacher_dir, "tiny,full"), other)
  teacher = {"teacher_image", "teacher_text", "mine_teacher"}
  expected = {
      "full": {s["name"] for s in lf_config(teacher_dir, "tiny").pipeline.stages},
      "wo_kd": teacher | {"stage1"},            # student stages: KD weights differ
      "wo_hn": teacher - {"mine_teacher"} | {"stage1"},   # student stages: no bank
      "wo_sf": teacher | {"stage1"},            # its one student stage is not in the full row
      "stage1_mse": teacher,                    # stage1 differs, so does all that reads it
      "wo_stage1": teacher,
      "text_layers=2": teacher,                 # the student's network differs from stage1 on
  }
  for ablation, names in expected.items():
    c = lf_config(teacher_dir, f"tiny,{ablation}")
    c.pipeline.reuse = str(other)
    assert _reused(c, other) == names, ablation
  os.remove(other / "stage1" / "eval.json")     # not done there: neither it nor its readers
  c = lf_config(teacher_dir, "tiny,wo_kd")
  assert _reused(c, other) == teacher


def test_reuse_copies_done_stages_with_a_marker_and_never_runs_them(teacher_dir, tmp_path):
  def no_run(*args):
    raise AssertionError("no stage may run: every one is done in the reused pipeline")
  other = tmp_path / "full"
  _fake_done_pipeline(lf_config(teacher_dir), other)
  (other / "stage1" / "checkpoints").mkdir()
  c = lf_config(teacher_dir)
  c.pipeline.reuse = str(other)
  summary = pipeline.run_pipeline(c, str(tmp_path / "row"), no_run, no_run, methods.RECIPES)
  assert [e.get("reused_from") for e in summary["stages"]] == [
      str(other / s["name"]) for s in c.pipeline.stages]
  assert (tmp_path / "row" / "stage1" / "checkpoints").is_dir()
  assert not list(tmp_path.glob("row/*.reuse-tmp"))


def test_reuse_of_another_config_or_of_nothing_is_refused(teacher_dir, tmp_path):
  def no_run(*args):
    raise AssertionError("no stage may run")
  c = lf_config(teacher_dir)
  c.pipeline.reuse = str(tmp_path / "nothing")
  with pytest.raises(ConfigError, match=r"reuse=.*nothing' holds no pipeline run .*--workdir of "
                     r"an earlier run"):
    pipeline.run_pipeline(c, str(tmp_path / "a"), no_run, no_run, methods.RECIPES)
  assert not (tmp_path / "a").exists()          # refused before anything is written
  other_seed = lf_config(teacher_dir)
  other_seed.seed = 1
  _fake_done_pipeline(other_seed, tmp_path / "seed1")
  c.pipeline.reuse = str(tmp_path / "seed1")
  with pytest.raises(ConfigError, match=r"ran another config: seed \(1 there, 0 here\)\. Only "
                     r"the pipeline section may differ"):
    pipeline.run_pipeline(c, str(tmp_path / "b"), no_run, no_run, methods.RECIPES)
  c.pipeline.reuse = str(tmp_path / "b")
  with pytest.raises(ConfigError, match="is this --workdir"):
    pipeline.run_pipeline(c, str(tmp_path / "b"), no_run, no_run, methods.RECIPES)


def test_cli_reports_a_bad_stage_in_one_line(tmp_path, teacher_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "-m", "jaxdistill.main", "--config=configs/leaner_faster.py:tiny",
       f"--workdir={tmp_path / 'run'}", f"--config.teachers.teacher.path={teacher_dir}",
       "--config.pipeline.student_text_layers=5"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: --config.pipeline.student_text_layers=5"), \
      result.stderr
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ a stage's run config

def test_stage_configs_resolve_networks_sources_and_banks(teacher_dir, tmp_path):
  c = lf_config(teacher_dir)
  teacher = json.loads((teacher_dir / "config.json").read_text())["model"]
  workdir = str(tmp_path / "run")
  by_name = {s["name"]: i for i, s in enumerate(c.pipeline.stages)}
  t = pipeline.stage_config(c, by_name["teacher_image"], workdir)
  assert t.method == "dual" and t.model.to_dict() == teacher and t.train.num_steps == 4
  assert t.init_from[0]["source"] == f"workdir:{teacher_dir}"
  assert t.data.tokenizer == os.path.join(str(teacher_dir), "tokenizer.json")
  s1 = pipeline.stage_config(c, by_name["stage1"], workdir)
  assert s1.method == "leaner_faster" and s1.leaner_faster.stage == "stage1"
  assert s1.data.train_split == "unpaired" and s1.leaner_faster.hard_negatives == 0
  assert (s1.model.text_width, s1.model.text_layers, s1.model.embed_dim) == (48, 1, 24)
  assert s1.model.vision_width == c.model.vision_width            # the student's own image tower
  assert s1.teachers.teacher.path == str(teacher_dir)
  assert s1.init_from[0]["layers"] == "first:1"
  si = pipeline.stage_config(c, by_name["student_image"], workdir)
  assert (si.model.text_width, si.model.text_layers) == (48, 2)   # T''s whole text tower
  assert si.teachers.teacher.path == os.path.join(workdir, "teacher_text")
  assert si.mining.bank_dir == os.path.join(workdir, "mine_teacher", "bank")
  assert si.leaner_faster.hard_negatives == 2 and si.leaner_faster.tower == "image"
  assert [e["source"] for e in si.init_from] == [f"workdir:{workdir}/stage1",
                                                 f"workdir:{workdir}/teacher_text"]
  assert si.trainable[0] == ("student/text_(encoder|projection)/.*", None)
  st = pipeline.stage_config(c, by_name["student_text"], workdir)
  assert st.model.text_layers == 1 and st.train.num_steps == c.train.num_steps
  assert st.mining.bank_dir == os.path.join(workdir, "mine_student_image", "bank")
  m = pipeline.mine_config(c, by_name["mine_student_image"], workdir)
  assert m.mining.tower_workdir == os.path.join(workdir, "student_image")
  assert "pipeline" not in si and "pipeline" in c                 # the pipeline config is untouched
  own = lf_config(teacher_dir, "tiny,text_layers=0")
  s1 = pipeline.stage_config(own, by_name["stage1"], workdir)
  assert (s1.model.text_width, s1.model.text_layers) == (own.model.text_width, own.model.text_layers)
  assert s1.model.embed_dim == 24 and s1.init_from == ()


# ------------------------------------------------------------------------ the stage recipe's loss

def _recipe_loss(stage, **settings):
  """The stage recipe's loss_fn on a random tiny student and a random tiny teacher (another
  seed), plus its pieces for reference computations."""
  from jaxdistill.methods import leaner_faster
  from jaxdistill.models.build import build_model, init_params, towers
  from jaxdistill.teachers.workdir import from_towers
  c = recipe_config("dual", "tiny")
  c.leaner_faster = leaner_faster.section()
  c.leaner_faster.stage = stage
  c.leaner_faster.update(settings)
  model = build_model(c.model)
  student = init_params(model, c.model, jax.random.PRNGKey(0))
  t_params = init_params(model, c.model, jax.random.PRNGKey(1))
  teacher = from_towers("t", towers(model), t_params, temperature=0.05)
  return c, leaner_faster.make_loss_fn(c, model, teacher), {"student": student}, teacher


def _batch(seed=0, n=8, k=0):
  from conftest import random_pairs
  rng = np.random.default_rng(seed)
  batch = random_pairs(rng, n, length=32, bracket=True)
  batch["image_id"] = np.arange(n, dtype=np.int32)
  if k:
    neg = random_pairs(rng, n * k, length=32, bracket=True)
    batch["neg_text_ids"] = neg["text_ids"].reshape(n, k, -1)
    batch["neg_text_mask"] = neg["text_mask"].reshape(n, k, -1)
    batch["neg_image"] = neg["image"].reshape(n, k, 56, 56, 1)
    owner = rng.integers(0, n, (n, k)).astype(np.int32)
    owner[0, 0] = -1                                        # missing from the bank
    batch["neg_text_owner"] = batch["neg_image_owner"] = owner
  return batch


def test_stage1_losses_match_the_loss_module_and_ignore_the_pairing():
  from jaxdistill.losses import leaner_faster as L
  from jaxdistill.models.build import build_model, towers
  mesh = one_device_mesh()
  batch = _batch()
  shuffled = dict(batch, text_ids=batch["text_ids"][::-1], text_mask=batch["text_mask"][::-1])
  for loss_kind in ("contrastive", "mse", "infonce"):
    c, loss_fn, params, teacher = _recipe_loss("stage1", stage1_loss=loss_kind, tower="both")
    frozen = {"teacher": teacher.params}
    got = loss_and_grads(loss_fn, mesh, params, batch, frozen)
    net = towers(build_model(c.model))
    p = params["student"]
    s_v = net.embed_image(p, batch["image"])[0]
    s_t = net.embed_text(p, batch["text_ids"], batch["text_mask"])[0]
    t_v = teacher.embed_images(teacher.params, batch["image"])
    t_t = teacher.embed_texts(teacher.params, batch["text_ids"], batch["text_mask"])
    tau = net.temperature(p)
    if loss_kind == "contrastive":
      want = L.intra_modal_contrastive_loss(s_v, t_v, tau)[0] + L.intra_modal_contrastive_loss(s_t, t_t, tau)[0]
    elif loss_kind == "mse":
      want = L.mse_distillation_loss(s_v, t_v)[0] + L.mse_distillation_loss(s_t, t_t)[0]
    else:
      want = L.infonce_loss(s_v, s_t, tau)[0]
    np.testing.assert_allclose(got.loss, want, rtol=1e-5)
    other = loss_and_grads(loss_fn, mesh, params, shuffled, frozen)
    if loss_kind == "infonce":          # the one stage-1 loss that reads the pairing
      assert abs(other.loss - got.loss) > 1e-4
    else:                               # eq. 2-3 and MSE: images and texts apart
      np.testing.assert_allclose(other.loss, got.loss, rtol=1e-6)


def test_stage2_image_tower_loss_is_stage2_loss_with_the_text_bank():
  from jaxdistill.losses import leaner_faster as L
  from jaxdistill.models.build import build_model, towers
  k = 2
  c, loss_fn, params, teacher = _recipe_loss("stage2", tower="image", hard_negatives=k)
  batch = _batch(k=k)
  got = loss_and_grads(loss_fn, one_device_mesh(), params, batch, {"teacher": teacher.params})
  net, p, n = towers(build_model(c.model)), params["student"], 8
  s_v = net.embed_image(p, batch["image"])[0]
  s_t = net.embed_text(p, batch["text_ids"], batch["text_mask"])[0]
  mined = net.embed_text(p, batch["neg_text_ids"].reshape(n * k, -1),
                         batch["neg_text_mask"].reshape(n * k, -1))[0].reshape(n, k, -1)
  owner = batch["neg_text_owner"]
  valid = (owner != -1) & (owner != np.arange(n)[:, None])
  want, parts = L.stage2_loss(
      s_v, s_t, teacher.embed_images(teacher.params, batch["image"]),
      teacher.embed_texts(teacher.params, batch["text_ids"], batch["text_mask"]),
      net.temperature(p), tower="image", mined_text=mined, mined_text_valid=jnp.asarray(valid),
      teacher_temperature=0.05)
  np.testing.assert_allclose(got.loss, want, rtol=1e-5)
  assert "hn_v2t" in got.metrics and "hn_t2v" not in got.metrics
  np.testing.assert_allclose(got.metrics["hn_valid_v2t"], valid.mean(), rtol=1e-6)
  np.testing.assert_allclose(got.metrics["kd_kl"], parts["kd_kl"], rtol=1e-5)


# ------------------------------------------------------------------------ the unpaired pool

def test_unpaired_pool_is_disjoint_from_the_benchmark_splits():
  from jaxdistill.data.benchmark import prepare_benchmark
  from jaxdistill.data.compositional import _layout_index, parse_caption
  c = recipe_config("leaner_faster", "tiny")
  c.data.num_unpaired = 512
  bench = prepare_benchmark(c, None)
  pool, train = bench.splits["unpaired"], bench.splits["train"]
  assert len(pool.image_ids) == 512 and bench.tokens["unpaired"][0].shape[:2] == (512, 5)
  # items: Fashion-MNIST train images, none used by the train split, none used twice
  used = pool.source_indices[pool.source_indices >= 0]
  assert len(np.unique(used)) == len(used)
  assert not set(used.tolist()) & set(train.source_indices[train.source_indices >= 0].tolist())
  # layouts: none of any benchmark split; so no pool caption is true of a stage-2 image
  pool_layouts = set(_layout_index(pool.layouts).tolist())
  assert len(pool_layouts) == 512
  for split in ("train", "val", "test"):
    assert not pool_layouts & set(_layout_index(bench.splits[split].layouts).tolist()), split
  train_captions = {t for caps in train.captions for t in caps}
  assert not train_captions & {t for caps in pool.captions for t in caps}
  for layout, texts in zip(pool.layouts[:32], pool.captions[:32]):
    for text in texts:
      np.testing.assert_array_equal(parse_caption(text), layout)
  # the images are drawn from those items; ids apart from the splits'
  from jaxdistill.data.fashion_mnist import load_fashion_mnist
  items = load_fashion_mnist().train_images
  cell = pool.source_indices[0]
  first = np.flatnonzero(cell >= 0)[0]
  row, col = divmod(int(first), 2)
  np.testing.assert_array_equal(pool.images[0, 28 * row:28 * row + 28, 28 * col:28 * col + 28],
                                items[cell[first]])
  assert pool.image_ids.min() == 3_000_000
  # deterministic, and the benchmark's own splits unchanged by the pool
  again = prepare_benchmark(c, None).splits["unpaired"]
  np.testing.assert_array_equal(again.images, pool.images)
  assert again.captions == pool.captions
  c.data.num_unpaired = 0
  plain = prepare_benchmark(c, None)
  assert "unpaired" not in plain.splits
  np.testing.assert_array_equal(plain.splits["train"].images, train.images)
  np.testing.assert_array_equal(plain.tokens["test"][0], bench.tokens["test"][0])


def test_unpaired_pool_too_large_names_the_key():
  from jaxdistill.data.compositional import build_benchmark
  from jaxdistill.data.fashion_mnist import load_fashion_mnist
  from jaxdistill.data.unpaired import UnpairedPoolError, build_unpaired_pool
  fm = load_fashion_mnist()
  splits = build_benchmark(fm, seed=0, num_train=64, num_val=8, num_test=8)
  with pytest.raises(UnpairedPoolError, match=r"num_unpaired=20000: only \d+ layouts are left"):
    build_unpaired_pool(fm, splits, seed=0, num=20000, group_size=4)
  with pytest.raises(UnpairedPoolError, match="multiple of --config.data.group_size=4"):
    build_unpaired_pool(fm, splits, seed=0, num=10, group_size=4)
