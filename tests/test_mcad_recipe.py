"""MCAD recipe (paper 001): every Table 1 row runs as a config choice, reads only the teachers
and modules its terms need, equals the loss functions composed by hand, trains the student and
the integration module (alpha included) and never a teacher, gives the same numbers on 8
devices as on 1, and trains end to end through the train loop with workdir teachers."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_devices_agree, loss_and_grads, one_device_mesh, random_pairs,
                      recipe_config)
from jaxdistill import methods
from jaxdistill.config import ConfigError
from jaxdistill.losses import mcad as mcad_losses
from jaxdistill.losses.contrastive import similarity_logits
from jaxdistill.methods import mcad
from jaxdistill.methods.base import STUDENT, student_module
from jaxdistill.models.build import build_model, init_params, towers
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.teachers.workdir import from_towers, init_workdir

B, L = 16, 12


def _config(loss="mt+mt_fa", k=4):
  c = recipe_config("mcad", "tiny")
  c.model.vocab_size = 40
  c.model.max_len = L
  c.mcad.loss, c.mcad.k = loss, k
  return c


def _teacher(config, kind, seed, width):
  """A random network of the tiny preset's shape (embedding / cross width `width`) as a Teacher
  with pair_outputs (LoopITR) or dual towers only."""
  tc = config.model.copy_and_resolve_references()
  tc.kind, tc.embed_dim, tc.cross_width = kind, width, width
  model = build_model(tc)
  params = init_params(model, tc, jax.random.PRNGKey(seed))
  return from_towers(f"random-{kind}", towers(model), params, temperature=0.05)


@pytest.fixture(scope="module")
def setup():
  config = _config()
  dual, cross = _teacher(config, "dual", 1, 32), _teacher(config, "loopitr", 2, 20)
  student = student_module(config)
  integration = mcad.integration_module(config, 32, 20)
  params = {STUDENT: student.init(jax.random.PRNGKey(0)),
            mcad.INTEGRATION: integration.init(jax.random.PRNGKey(3))}
  batch = random_pairs(np.random.default_rng(0), B, L)
  return dual, cross, integration, params, batch


def _run(setup, loss, mesh=None, k=4):
  dual, cross, integration, params, batch = setup
  config = _config(loss, k)
  names = mcad.teacher_names(config)
  frozen = {name: t.params for name, t in (("dual", dual), ("cross", cross)) if name in names}
  if "mt" not in loss:
    params = {STUDENT: params[STUDENT]}
  loss_fn = mcad.make_loss_fn(config, student_module(config).model, integration.model,
                              dual if "dual" in names else None, cross if "cross" in names else None)
  return loss_and_grads(loss_fn, mesh or one_device_mesh(), params, batch, frozen)


@pytest.mark.parametrize("row,loss", list(mcad.TABLE_1.items()))
def test_every_table_1_row_trains_the_student(setup, row, loss):
  out = _run(setup, loss)
  assert np.isfinite(out.loss) and out.loss > 0, row
  grads = jax.tree.leaves(out.grads[STUDENT])
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert sum(float(np.abs(g).sum()) for g in grads) > 0, row
  if "mt" in loss:   # the integration module trains, alpha and tau^T included
    g = out.grads[mcad.INTEGRATION]
    assert float(np.abs(g["alpha"])) > 0 and float(np.abs(g["log_temperature"])) > 0
    for name in ("g1", "g2", "g3", "g4"):
      assert sum(float(np.abs(x).sum()) for x in jax.tree.leaves(g[name])) > 0, name


def test_terms_read_only_what_they_need():
  assert mcad.teacher_names(_config("gt")) == ()
  assert mcad.teacher_names(_config("gt+clip")) == ("dual",)
  assert mcad.teacher_names(_config("clip+clip_fa")) == ("dual",)
  assert mcad.teacher_names(_config("albef+gt")) == ("dual", "cross")
  assert mcad.teacher_names(_config("mt+mt_fa")) == ("dual", "cross")


def test_recipe_loss_is_the_losses_composed_by_hand(setup):
  """L_MT + L_MT_FA of the recipe = the loss functions applied to the same features."""
  dual, cross, integration, params, batch = setup
  config = _config()
  out = _run(setup, "mt+mt_fa")
  student = towers(student_module(config).model)
  p = params[STUDENT]
  img_s = student.embed_image(p, batch["image"])[0]
  txt_s = student.embed_text(p, batch["text_ids"], batch["text_mask"])[0]
  tau_s = student.temperature(p)
  img_ds = dual.embed_images(dual.params, batch["image"])
  txt_ds = dual.embed_texts(dual.params, batch["text_ids"], batch["text_mask"])
  targets = mcad_losses.dual_stream_targets(img_ds, txt_ds, 0.05, 4)
  pi, pt = mcad_losses.top_k_pairs(targets.top_i2t, targets.top_t2i)
  p_match, cls = cross.pair_outputs(cross.params, batch["image"], batch["text_ids"],
                                    batch["text_mask"], pi.reshape(-1), pt.reshape(-1))
  p_match, cls = p_match.reshape(pi.shape), cls.reshape(*pi.shape, -1)
  targets = targets._replace(ss_i2t=p_match[0], ss_t2i=p_match[1])
  fused = integration.model.apply({"params": params[mcad.INTEGRATION]}, img_ds, txt_ds,
                                  cls[0], cls[1], targets.top_i2t, targets.top_t2i)
  teacher, fai, fat = mcad_losses.integrated_logits(img_s, txt_s, tau_s, fused,
                                                    targets.top_i2t, targets.top_t2i)
  expected = (mcad_losses.mt_loss(similarity_logits(img_s, txt_s, tau_s), teacher, targets)[0]
              + mcad_losses.mt_fa_loss(fai, fat, targets)[0])
  np.testing.assert_allclose(out.loss, expected, rtol=1e-5)


def test_gt_alone_is_the_contrastive_loss_summed_both_ways(setup):
  _, _, _, params, batch = setup
  config = _config("gt")
  student = towers(student_module(config).model)
  p = params[STUDENT]
  logits = similarity_logits(student.embed_image(p, batch["image"])[0],
                             student.embed_text(p, batch["text_ids"], batch["text_mask"])[0],
                             student.temperature(p))
  manual = sum(float(jnp.mean(jax.nn.logsumexp(x, axis=1) - jnp.diag(x))) for x in logits)
  np.testing.assert_allclose(_run(setup, "gt").loss, manual, rtol=1e-5)


@pytest.mark.parametrize("loss", ["mt+mt_fa", "albef+gt", "clip+clip_fa"])
def test_eight_devices_equal_one_device(setup, loss):
  many = _run(setup, loss, make_mesh(devices=jax.devices()))
  one = _run(setup, loss)
  assert_devices_agree(many, one)


@pytest.mark.parametrize("overrides,needle", [
    ({"loss": "mt+bogus"}, "mcad.loss='mt+bogus' is not valid"),
    ({"loss": "mt+mt"}, "distinct terms"),
    ({"loss": ""}, "is not valid"),
    ({"k": 0}, "mcad.k=0 must lie in"),
    ({"k": 17}, "mcad.k=17 must lie in"),
])
def test_bad_settings_name_the_key_and_the_fix(overrides, needle):
  config = _config()
  for key, value in overrides.items():
    config.mcad[key] = value
  with pytest.raises(ConfigError, match=re.escape(needle)):
    mcad.validate(config)


def test_trains_end_to_end_with_workdir_teachers(tmp_path):
  """configs/mcad.py:tiny through the train loop: a dual-encoder teacher run and a LoopITR
  teacher run (untrained workdirs of the tiny preset) as config.teachers.dual / .cross."""
  dual_config = recipe_config("dual", "tiny")
  cross_config = recipe_config("loopitr", "tiny")
  init_workdir(dual_config, str(tmp_path / "teacher_dual"), seed=1)
  init_workdir(cross_config, str(tmp_path / "teacher_cross"), seed=2)
  config = recipe_config("mcad", "tiny")
  config.teachers.dual.path = str(tmp_path / "teacher_dual")
  config.teachers.cross.path = str(tmp_path / "teacher_cross")
  config.train.num_steps = 3
  config.eval.split = "val"
  methods.validate(config)
  results = methods.train(config, str(tmp_path / "run"))
  assert np.isfinite(results["dual"]["rsum"])
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["mt_fa"]) and "alpha" in rows[-1]


def test_cached_dual_teacher_trains_as_the_online_one(tmp_path):
  """Deliver 4: the dual teacher's embeddings are per example, so --mode=cache_teacher's features
  of the train split (teachers.dual.kind=cache, read from the batch) give the online teacher's
  numbers, step by step, with the cross teacher still online (mt reads both)."""
  from jaxdistill.teachers import cache
  init_workdir(recipe_config("dual", "tiny"), str(tmp_path / "teacher_dual"), seed=1)
  init_workdir(recipe_config("loopitr", "tiny"), str(tmp_path / "teacher_cross"), seed=2)

  def config(kind, path):
    c = recipe_config("mcad", "tiny")
    c.mcad.loss = "gt+clip+clip_fa+mt"
    c.teachers.dual.kind, c.teachers.dual.path = kind, path
    c.teachers.cross.path = str(tmp_path / "teacher_cross")
    c.train.num_steps, c.train.log_every, c.eval.split = 3, 1, "val"
    return c

  online = config("workdir", str(tmp_path / "teacher_dual"))
  online.teacher_cache.teacher, online.teacher_cache.splits = "dual", "train"
  written = cache.run(online, str(tmp_path / "cache"))
  cached = config("cache", written["train"])
  rows = {}
  for name, c in (("online", online), ("cached", cached)):
    methods.validate(c)
    methods.train(c, str(tmp_path / name))
    rows[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
  assert [r["step"] for r in rows["cached"]] == [1, 2, 3]
  for want, got in zip(rows["online"], rows["cached"]):
    for key in ("loss", "gt", "clip", "clip_fa", "mt", "ss_match"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_mobile_preset_trains_from_the_packaged_weights(tmp_path):
  """configs/mcad.py:mobile (EfficientNet-Lite0 + MiniLM-L6's first 3 layers, both through
  init_from; embed_dim = the dual teacher's 256) validates and trains 2 steps of the L_GT row,
  which reads no teacher."""
  config = recipe_config("mcad", "mobile")
  assert config.model.embed_dim == 256 and config.model.text_layers == 3
  assert [e["architecture"] for e in config.init_from] == ["efficientnet_lite0", "bert"]
  config.mcad.loss = "gt"
  config.batch_size, config.data.group_size = 8, 4
  config.data.num_train, config.data.num_val, config.data.num_test = 64, 16, 16
  config.train.num_steps = config.train.checkpoint_every = 2
  config.optim.warmup_steps = 1
  config.eval.split = "val"
  methods.validate(config)
  results = methods.train(config, str(tmp_path / "run"))
  assert np.isfinite(results["dual"]["rsum"])
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["gt"])
