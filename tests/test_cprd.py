"""CPRD recipe (paper 002): 8-device vs 1-device loss, gradients and queue; every distillation
switch finite; queue restored from a real orbax checkpoint through the train loop."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdistill.methods import cprd as cprd_method
from jaxdistill.methods.dual import build_model as build_student
from jaxdistill.models.loopitr import LoopITRModel, build_model, init_params
from jaxdistill.parallel import queue as fq
from jaxdistill.parallel.mesh import batch_sharding, make_mesh, replicated
from jaxdistill.teachers.base import make_teacher

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from configs import cprd as cprd_config  # noqa: E402

B, L, N_TRAIN, OFFSET, C = 16, 12, 64, 1000, 2   # C: captions per train image


def _config(**overrides):
  c = cprd_config.get_config("tiny")
  c.model.vocab_size = 40
  c.model.max_len = L
  c.teacher.path = "unused"
  for k, v in overrides.items():
    c.cprd[k] = v
  return c


def _tokens(rng, n):
  ids = rng.integers(5, 40, (n, L)).astype(np.int32)
  lengths = rng.integers(4, L, n)
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  return np.where(mask > 0, ids, 0).astype(np.int32), mask


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids, mask = _tokens(rng, B)
  return {"image": rng.normal(size=(B, 56, 56, 1)).astype(np.float32), "text_ids": ids,
          "text_mask": mask, "image_id": (OFFSET + 2 * np.arange(B)).astype(np.int32)}


@pytest.fixture(scope="module")
def setup():
  """A random LoopITR network as the cross teacher, random train images, a student, and a
  queue 30/40 full whose ids repeat some of the batch's (duplicates of positives)."""
  config = _config()
  teacher_model = build_model(config.model)
  t_params = init_params(teacher_model, jax.random.PRNGKey(1), (56, 56, 1), L)

  def match_scores(p, images, ids, mask):
    _, it = teacher_model.apply({"params": p}, images, method=LoopITRModel.encode_image)
    _, tt = teacher_model.apply({"params": p}, ids, mask, method=LoopITRModel.encode_text)
    return 3.0 * teacher_model.apply({"params": p}, tt, mask, it, method=LoopITRModel.match_logits)[:, 0]

  teacher = make_teacher("random", t_params, match_scores=match_scores)
  rng = np.random.default_rng(2)
  frozen = {"teacher": t_params,
            "images": rng.normal(size=(N_TRAIN, 56, 56, 1)).astype(np.float32)}
  student = build_student(config.model)
  params = student.init(jax.random.PRNGKey(0), jnp.zeros((1, 56, 56, 1)),
                        jnp.zeros((1, L), jnp.int32), jnp.ones((1, L), jnp.int32))["params"]
  ema = jax.tree.map(lambda x: x + 0.01 * jnp.sin(x), params)
  queue = fq.create_queue(40, {"image": jax.ShapeDtypeStruct((32,), jnp.float32),
                               "text": jax.ShapeDtypeStruct((32,), jnp.float32),
                               "image_index": jax.ShapeDtypeStruct((), jnp.int32),
                               "text_ids": jax.ShapeDtypeStruct((L,), jnp.int32),
                               "text_mask": jax.ShapeDtypeStruct((L,), jnp.int32)})
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  ids, mask = _tokens(rng, 30)
  index = rng.integers(0, N_TRAIN, 30).astype(np.int32)
  queue = fq.enqueue(queue, {"image": unit(rng.normal(size=(30, 32))).astype(np.float32),
                             "text": unit(rng.normal(size=(30, 32))).astype(np.float32),
                             "image_index": index, "text_ids": ids, "text_mask": mask},
                     (OFFSET + index).astype(np.int32))
  return teacher, frozen, params, ema, queue


def _loss_and_grads(config, mesh, setup, distill_teacher=True):
  teacher, frozen, params, ema, queue = setup
  score = cprd_method._scorer(teacher, "cross")
  loss_fn = cprd_method.make_loss_fn(config, build_student(config.model), score, OFFSET, C)
  rep = replicated(mesh)
  teachers = (ema, frozen) if distill_teacher else ema
  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
               in_shardings=(rep, rep, batch_sharding(mesh), rep, rep))
  return jax.device_get(fn(params, teachers, _batch(), jnp.asarray(3), queue))


@pytest.mark.parametrize("distill", ["cprd", "kl"])   # the two loss paths
def test_eight_devices_equal_one_device(setup, distill):
  config = _config(distill=distill, threshold=0.5)
  (l8, (m8, q8)), g8 = _loss_and_grads(config, make_mesh(devices=jax.devices()), setup)
  (l1, (m1, q1)), g1 = _loss_and_grads(config, make_mesh(devices=jax.devices()[:1]), setup)
  assert np.isfinite(l1) and float(m1["distill"]) > 0
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max()))), g8, g1)
  np.testing.assert_array_equal(q8.ids, q1.ids)         # same keys in the same slots
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), q8, q1)
  if distill == "cprd":
    assert 0 < float(m1["i2t_cprd_valid"]) < 4 and 0 < float(m1["i2t_scored"]) <= 4


def test_other_switches_are_finite_and_enqueue_the_batch(setup):
  mesh = make_mesh(devices=jax.devices()[:1])
  for distill in ("none", "m3se", "rm3se", "cprd_mstar"):   # cprd, kl: the 8-device test
    config = _config(distill=distill, threshold=0.5)
    (loss, (parts, queue)), grads = _loss_and_grads(config, mesh, setup, distill != "none")
    assert np.isfinite(loss), distill
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), distill
    if distill == "none":
      assert float(parts["distill"]) == 0.0
  # 30 + 16 entries into 40 slots: the batch lands in slots 30..39, 0..5.
  assert int(queue.count) == 40 and int(queue.ptr) == 6
  np.testing.assert_array_equal(np.concatenate([queue.ids[30:], queue.ids[:6]]),
                                _batch()["image_id"])


def test_offline_bank_equals_online_teacher_when_it_holds_every_pair(setup):
  """§3.2.2: a bank holding every (image, caption) pair's cross score gives the online loss and
  gradients when every queue entry is scorable online (N_c = N_q); pairs absent from the bank
  are invalid: an empty bank scores no hard negative and distils nothing."""
  teacher, _, params, ema, _ = setup
  rng = np.random.default_rng(5)
  images = rng.normal(size=(N_TRAIN, 56, 56, 1)).astype(np.float32)
  ids, mask = _tokens(rng, N_TRAIN * C)                 # caption row r = C * image row + caption
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
    spec = cprd_method.queue_spec(config)
    queue = fq.create_queue(config.cprd.queue_size, spec)
    values = dict(entries, caption_row=q_caption_rows) if with_caption_row else entries
    queue = fq.enqueue(queue, values, (OFFSET + q_rows).astype(np.int32))
    scorer = None if with_caption_row else cprd_method._scorer(teacher, "cross")
    loss_fn = cprd_method.make_loss_fn(config, build_student(config.model), scorer, OFFSET, C)
    return jax.device_get(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, (ema, frozen), batch, jnp.asarray(3), queue))

  online_config = _config(distill="cprd", threshold=0.5, cross_queue_size=40)
  offline_config = _config(distill="cprd", threshold=0.5, cross_queue_size=40, bank_dir="bank")
  (l_on, (m_on, _)), g_on = run(online_config, {"teacher": teacher.params, "images": images}, False)
  (l_off, (m_off, q_off)), g_off = run(offline_config, full, True)
  assert float(m_on["i2t_cprd_valid"]) > 0 and float(m_on["t2i_cprd_valid"]) > 0
  np.testing.assert_allclose(l_off, l_on, rtol=1e-5)
  for k in m_on:
    np.testing.assert_allclose(m_off[k], m_on[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_off, g_on)
  np.testing.assert_array_equal(q_off.values["caption_row"][30:], rows[:10] * C + caption[:10])
  empty = {k: (np.full_like(v, -1) if k.endswith("keys") else v) for k, v in full.items()}
  (l_empty, (m_empty, _)), _ = run(offline_config, empty, True)
  assert float(m_empty["i2t_scored"]) == 0 and float(m_empty["distill"]) == 0
  np.testing.assert_allclose(l_empty, m_empty["itc"], rtol=1e-6)


def test_bad_switch_names_the_key():
  with pytest.raises(ValueError, match="cprd.distill"):
    cprd_method.validate(_config(distill="mse"))
  with pytest.raises(ValueError, match="cross_queue_size"):
    cprd_method.validate(_config(cross_queue_size=41))
  with pytest.raises(ValueError, match="bank_dir is the offline CPRD variant.*not kl"):
    cprd_method.validate(_config(distill="kl", bank_dir="runs/x"))
  with pytest.raises(ValueError, match="bank_dir=/nonexistent holds no finished teacher cache"):
    cprd_method.validate(_config(bank_dir="/nonexistent"))


def test_queue_restored_from_checkpoint_through_the_loop(tmp_path):
  """4 steps straight vs 2 steps + resume: the checkpointed queue at step 4 is the same."""
  from jaxdistill.train import loop
  from jaxdistill.train.checkpoint import Checkpointer

  config = cprd_config.get_config("tiny")
  config.cprd.distill = "none"          # the queue path; no teacher needed
  config.train.num_steps = 4
  config.train.checkpoint_every = 2
  config.train.max_checkpoints = 3
  config.eval.split = "val"
  work = str(tmp_path / "run")
  loop.train_and_evaluate(config, work)

  def saved(step):
    ckpt = Checkpointer(work)
    state = ckpt.restore_raw(step)
    ckpt.close()
    return state

  straight = saved(4)
  assert int(straight["recipe_state"]["count"]) == 40    # 4 x 16 keys into 40 slots
  manager = ocp.CheckpointManager(os.path.join(work, "checkpoints"))
  manager.delete(4)                                       # as if the run had died after step 2
  manager.close()
  loop.train_and_evaluate(config, work)                   # resumes from step 2
  resumed = saved(4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               resumed["recipe_state"], straight["recipe_state"])
  np.testing.assert_array_equal(resumed["recipe_state"]["ids"], straight["recipe_state"]["ids"])
