"""CPRD recipe (paper 002): 8-device vs 1-device loss, gradients and queue; every distillation
switch finite; queue restored from a real orbax checkpoint through the train loop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (assert_devices_agree, loss_and_grads, one_device_mesh, random_captions,
                      random_pairs, recipe_config)
from jaxdistill import methods
from jaxdistill.config import ConfigError
from jaxdistill.methods import cprd as cprd_method
from jaxdistill.methods.base import STUDENT, student_module
from jaxdistill.models.build import build_model, init_params, towers
from jaxdistill.parallel import queue as fq
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.teachers.base import make_teacher

B, L, N_TRAIN, OFFSET, C = 16, 12, 64, 1000, 2   # C: captions per train image


def _config(**overrides):
  c = recipe_config("cprd", "tiny")
  c.model.vocab_size = 40
  c.model.max_len = L
  c.teachers.teacher.path = "unused"
  for k, v in overrides.items():
    c.cprd[k] = v
  return c


def _batch(seed=0):
  batch = random_pairs(np.random.default_rng(seed), B, L)
  return dict(batch, image_id=(OFFSET + 2 * np.arange(B)).astype(np.int32))


@pytest.fixture(scope="module")
def setup():
  """A random LoopITR network as the cross teacher, random train images, a student, its
  momentum copy, and a queue 30/40 full whose ids repeat some of the batch's (duplicates of
  positives). Returns (teacher, frozen {teacher, images}, params, ema, queue)."""
  config = _config()
  teacher_config = config.model.copy_and_resolve_references()
  teacher_config.kind = "loopitr"
  teacher_model = build_model(teacher_config)
  t = towers(teacher_model)
  t_params = init_params(teacher_model, teacher_config, jax.random.PRNGKey(1))

  def match_scores(p, images, ids, mask):
    _, image_tokens = t.embed_image(p, images)
    _, text_tokens = t.embed_text(p, ids, mask)
    return 3.0 * t.match_scores(p, image_tokens, text_tokens, mask)

  teacher = make_teacher("random", t_params, match_scores=match_scores)
  rng = np.random.default_rng(2)
  frozen = {"teacher": t_params,
            "images": rng.normal(size=(N_TRAIN, 56, 56, 1)).astype(np.float32)}
  params = {STUDENT: student_module(config).init(jax.random.PRNGKey(0))}
  ema = jax.tree.map(lambda x: x + 0.01 * jnp.sin(x), params[STUDENT])
  queue = fq.create_queue(40, cprd_method.queue_spec(config))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  ids, mask = random_captions(rng, 30)
  index = rng.integers(0, N_TRAIN, 30).astype(np.int32)
  queue = fq.enqueue(queue, {"image": unit(rng.normal(size=(30, 32))).astype(np.float32),
                             "text": unit(rng.normal(size=(30, 32))).astype(np.float32),
                             "image_index": index, "text_ids": ids, "text_mask": mask},
                     (OFFSET + index).astype(np.int32))
  return teacher, frozen, params, ema, queue


def _loss_fn(config, scorer):
  return cprd_method.make_loss_fn(config, student_module(config).model, scorer, OFFSET, C)


def _run(config, mesh, setup, distill_teacher=True):
  """The loss with the online teacher (or, distill_teacher=False, with the momentum encoder only)."""
  teacher, frozen, params, ema, queue = setup
  frozen = dict(frozen if distill_teacher else {}, ema={STUDENT: ema})
  loss_fn = _loss_fn(config, cprd_method._scorer(teacher, "cross"))
  return loss_and_grads(loss_fn, mesh, params, _batch(), frozen, {"queue": queue}, step=3)


@pytest.mark.parametrize("distill", ["cprd", "kl"])   # the two loss paths
def test_eight_devices_equal_one_device(setup, distill):
  config = _config(distill=distill, threshold=0.5)
  many = _run(config, make_mesh(devices=jax.devices()), setup)
  one = _run(config, one_device_mesh(), setup)
  assert np.isfinite(one.loss) and float(one.metrics["distill"]) > 0
  assert_devices_agree(many, one)
  q8, q1 = many.extra["queue"], one.extra["queue"]
  np.testing.assert_array_equal(q8.ids, q1.ids)         # same keys in the same slots
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), q8, q1)
  if distill == "cprd":
    m1 = one.metrics
    assert 0 < float(m1["i2t_cprd_valid"]) < 4 and 0 < float(m1["i2t_scored"]) <= 4


def test_other_switches_are_finite_and_enqueue_the_batch(setup):
  mesh = one_device_mesh()
  for distill in ("none", "m3se", "rm3se", "cprd_mstar"):   # cprd, kl: the 8-device test
    config = _config(distill=distill, threshold=0.5)
    out = _run(config, mesh, setup, distill != "none")
    assert np.isfinite(out.loss), distill
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(out.grads)), distill
    if distill == "none":
      assert float(out.metrics["distill"]) == 0.0
  queue = out.extra["queue"]
  # 30 + 16 entries into 40 slots: the batch lands in slots 30..39, 0..5.
  assert int(queue.count) == 40 and int(queue.ptr) == 6
  np.testing.assert_array_equal(np.concatenate([queue.ids[30:], queue.ids[:6]]),
                                _batch()["image_id"])


def test_cross_scores_embed_each_side_once_and_are_the_match_probability():
  """The online cross scorer (pair_outputs: each image and caption embedded once, pair p =
  (image p // (P/Pi), text p // (P/Pt))) equals every pair through the cross encoder with the
  query side repeated, and is softmax(ITM logits)[match] (paper 002's p in [0, 1])."""
  from jaxdistill.models.loopitr import LoopITRModel
  from jaxdistill.teachers.workdir import from_towers
  config = _config()
  tc = config.model.copy_and_resolve_references()
  tc.kind = "loopitr"
  model = build_model(tc)
  params = init_params(model, tc, jax.random.PRNGKey(3))
  teacher = from_towers("loopitr", towers(model), params, 0.07)
  assert teacher.pair_outputs is not None
  score = cprd_method._scorer(teacher, "cross")
  rng = np.random.default_rng(4)
  b, k = 3, 4
  images = rng.normal(size=(b * k, 56, 56, 1)).astype(np.float32)
  ids, mask = random_captions(rng, b * k)

  def brute(img, txt_ids, txt_mask):   # every pair through the whole network
    _, it = model.apply({"params": params}, img, method=LoopITRModel.encode_image)
    _, tt = model.apply({"params": params}, txt_ids, txt_mask, method=LoopITRModel.encode_text)
    logits = model.apply({"params": params}, tt, txt_mask, it, method=LoopITRModel.match_logits)
    return jax.nn.softmax(logits, axis=-1)[:, 0]

  rep = lambda x: np.repeat(x[:b], k, axis=0)
  np.testing.assert_allclose(score(params, images[:b], ids, mask),          # i2t: image once
                             brute(rep(images), ids, mask), atol=1e-5)
  np.testing.assert_allclose(score(params, images, ids[:b], mask[:b]),      # t2i: text once
                             brute(images, rep(ids), rep(mask)), atol=1e-5)
  np.testing.assert_allclose(score(params, images, ids, mask), brute(images, ids, mask), atol=1e-5)
  # A teacher with match_scores only (pairs gathered, sigmoid of the log-odds): the same.
  repeat = cprd_method._scorer(make_teacher("m", params, match_scores=teacher.match_scores), "cross")
  np.testing.assert_allclose(repeat(params, images[:b], ids, mask),
                             score(params, images[:b], ids, mask), atol=1e-5)


def test_momentum_encoder_and_teacher_get_no_gradient(setup):
  """The momentum encoder (frozen["ema"]["student"]) and the teacher's params (frozen["teacher"])
  are read under stop-grad: the loss's gradient with respect to them is zero."""
  teacher, frozen, params, ema, queue = setup
  loss_fn = _loss_fn(_config(distill="kl", threshold=0.5), cprd_method._scorer(teacher, "cross"))

  def loss(differentiated):
    f = {"teacher": differentiated["teacher"], "images": jnp.asarray(frozen["images"]),
         "ema": {STUDENT: differentiated["ema"]}}
    return loss_fn(params, f, {"queue": queue}, _batch(), jax.random.PRNGKey(0), jnp.asarray(3))[:2]

  (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      {"teacher": frozen["teacher"], "ema": ema})
  assert float(metrics["distill"]) > 0
  assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_offline_bank_equals_online_teacher_when_it_holds_every_pair(setup):
  """§3.2.2: a bank holding every (image, caption) pair's cross score gives the online loss and
  gradients when every queue entry is scorable online (N_c = N_q); pairs absent from the bank
  are invalid: an empty bank scores no hard negative and distils nothing."""
  teacher, _, params, ema, _ = setup
  rng = np.random.default_rng(5)
  images = rng.normal(size=(N_TRAIN, 56, 56, 1)).astype(np.float32)
  ids, mask = random_captions(rng, N_TRAIN * C)         # caption row r = C * image row + caption
  rows, caption = 2 * np.arange(B), rng.integers(0, C, B).astype(np.int32)
  batch = {"image": images[rows], "text_ids": ids[rows * C + caption],
           "text_mask": mask[rows * C + caption], "image_id": (OFFSET + rows).astype(np.int32),
           "caption_index": caption}
  # The cross teacher's probability for every (image row, caption row): [N_TRAIN, N_TRAIN * C].
  score = jax.jit(lambda image: jax.nn.sigmoid(teacher.match_scores(
      teacher.params, jnp.broadcast_to(image, (N_TRAIN * C, *image.shape)), ids, mask)))
  table = np.stack([np.asarray(score(image)) for image in images])
  full = {"i2t_keys": np.tile(np.arange(N_TRAIN * C, dtype=np.int32), (N_TRAIN, 1)),
          "i2t_scores": table, "t2i_keys": np.tile(np.arange(N_TRAIN, dtype=np.int32), (N_TRAIN * C, 1)),
          "t2i_scores": np.ascontiguousarray(table.T)}
  q_rows = rng.integers(0, N_TRAIN, 30).astype(np.int32)
  q_caption_rows = q_rows * C + rng.integers(0, C, 30).astype(np.int32)
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  entries = {"image": unit(rng.normal(size=(30, 32))), "text": unit(rng.normal(size=(30, 32))),
             "image_index": q_rows, "text_ids": ids[q_caption_rows], "text_mask": mask[q_caption_rows]}

  def run(config, frozen, with_caption_row):
    queue = fq.create_queue(config.cprd.queue_size, cprd_method.queue_spec(config))
    values = dict(entries, caption_row=q_caption_rows) if with_caption_row else entries
    queue = fq.enqueue(queue, values, (OFFSET + q_rows).astype(np.int32))
    scorer = None if with_caption_row else cprd_method._scorer(teacher, "cross")
    return loss_and_grads(_loss_fn(config, scorer), one_device_mesh(), params, batch,
                          dict(frozen, ema={STUDENT: ema}), {"queue": queue}, step=3)

  online_config = _config(distill="cprd", threshold=0.5, cross_queue_size=40)
  offline_config = _config(distill="cprd", threshold=0.5, cross_queue_size=40, bank_dir="bank")
  on = run(online_config, {"teacher": teacher.params, "images": images}, False)
  off = run(offline_config, {"bank": full}, True)
  assert float(on.metrics["i2t_cprd_valid"]) > 0 and float(on.metrics["t2i_cprd_valid"]) > 0
  np.testing.assert_allclose(off.loss, on.loss, rtol=1e-5)
  for k in on.metrics:
    np.testing.assert_allclose(off.metrics[k], on.metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               off.grads, on.grads)
  np.testing.assert_array_equal(off.extra["queue"].values["caption_row"][30:],
                                rows[:10] * C + caption[:10])
  empty = {k: (np.full_like(v, -1) if k.endswith("keys") else v) for k, v in full.items()}
  out = run(offline_config, {"bank": empty}, True)
  assert float(out.metrics["i2t_scored"]) == 0 and float(out.metrics["distill"]) == 0
  np.testing.assert_allclose(out.loss, out.metrics["itc"], rtol=1e-6)


@pytest.mark.parametrize("overrides,needle", [
    ({"distill": "mse"}, "--config.cprd.distill='mse' is not valid: use one of"),
    ({"cross_queue_size": 41}, "--config.cprd.cross_queue_size=41 (N_c) must lie in [0, queue_size=40]"),
    ({"distill": "kl", "bank_dir": "runs/x"},
     "--config.cprd.bank_dir is the offline CPRD variant (§3.2.2) and works with "
     "--config.cprd.distill=cprd or cprd_mstar, not kl"),
    ({"bank_dir": "/nonexistent"},
     "--config.cprd.bank_dir=/nonexistent holds no finished teacher cache: build one with "
     "--mode=cache_teacher"),
    ({}, "--config.teachers.teacher.path='unused' does not exist"),   # online: the teacher's path
])
def test_bad_switch_names_the_key_and_the_fix(overrides, needle):
  with pytest.raises(ConfigError) as info:
    methods.validate(_config(**overrides))
  assert needle in str(info.value)


def test_config_needs_a_teacher_unless_offline_or_itc_alone():
  config = _config()
  config.teachers.teacher.path = ""
  with pytest.raises(ConfigError, match="cprd.distill=cprd needs a frozen teacher: set "
                                        "--config.teachers.teacher.kind=workdir"):
    methods.validate(config)
  config.cprd.distill = "none"        # ITC alone reads no teacher
  methods.validate(config)


def test_queue_restored_from_checkpoint_through_the_loop(tmp_path):
  """4 steps straight vs 2 steps + resume: the checkpointed queue (state.extra["queue"]) at step
  4 is the same."""
  from jaxdistill.store.checkpoint import Checkpointer

  config = recipe_config("cprd", "tiny")
  config.cprd.distill = "none"          # the queue path; no teacher needed
  config.train.num_steps = 4
  config.train.checkpoint_every = 2
  config.train.max_checkpoints = 3
  config.eval.split = "val"
  work = str(tmp_path / "run")
  methods.validate(config)
  methods.train(config, work)

  def saved_queue(step):
    ckpt = Checkpointer(work)
    state = ckpt.restore_raw(step)
    ckpt.close()
    return state["extra"]["queue"]

  straight = saved_queue(4)
  assert int(straight["count"]) == 40    # 4 x 16 keys into 40 slots
  manager = ocp.CheckpointManager(os.path.join(work, "checkpoints"))
  manager.delete(4)                      # as if the run had died after step 2
  manager.close()
  methods.train(config, work)            # resumes from step 2
  resumed = saved_queue(4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               resumed, straight)
  np.testing.assert_array_equal(resumed["ids"], straight["ids"])
