"""Dual ITC recipe with corpus-mined hard negatives: the loss against numpy, 8 devices vs 1, and
the pipeline attaching each example's banked negatives (resume-exact)."""

import jax
import numpy as np
import pytest

from conftest import (assert_devices_agree, loss_and_grads, one_device_mesh, random_pairs,
                      recipe_config)
from jaxdistill import methods
from jaxdistill.config import ConfigError, validate
from jaxdistill.data import pipeline
from jaxdistill.data.compositional import build_benchmark, normalize_images
from jaxdistill.data.fashion_mnist import load_fashion_mnist
from jaxdistill.data.negatives import (I2T_FILE, T2I_FILE, MISSING, BankError, caption_ids,
                                      training_negatives, write_bank)
from jaxdistill.methods import dual as dual_method
from jaxdistill.methods.base import STUDENT
from jaxdistill.models.build import towers
from jaxdistill.parallel.mesh import make_mesh

B, K, L = 16, 2, 12


def _config(k=K, bank_dir=""):
  c = recipe_config("dual", "tiny")
  c.model.vocab_size, c.model.max_len = 40, L
  c.dual.hard_negatives = k
  c.mining.bank_dir = bank_dir
  return c


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  rows = random_pairs(rng, B * (1 + K), L)   # B positives, then B * K mined negatives
  ids, mask, images = rows["text_ids"], rows["text_mask"], rows["image"]
  owner_t = rng.integers(0, B + 4, (B, K)).astype(np.int32)   # some are the row's own image
  owner_t[0, 0] = MISSING
  owner_i = rng.integers(0, B + 4, (B, K)).astype(np.int32)
  return {"image": images[:B], "text_ids": ids[:B], "text_mask": mask[:B],
          "image_id": np.arange(B, dtype=np.int32), "group_id": np.arange(B, dtype=np.int32),
          "neg_text_ids": ids[B:].reshape(B, K, L), "neg_text_mask": mask[B:].reshape(B, K, L),
          "neg_text_owner": owner_t, "neg_image": images[B:].reshape(B, K, 56, 56, 1),
          "neg_image_owner": owner_i}


def _recipe(config, mesh):
  return dual_method.build(config, mesh, None, 1)   # the dual recipe reads no benchmark


@pytest.fixture(scope="module")
def params():
  recipe = _recipe(_config(), one_device_mesh())
  assert list(recipe.modules) == [STUDENT] and not recipe.frozen and not recipe.ema
  return {STUDENT: recipe.modules[STUDENT].init(jax.random.PRNGKey(0))}


def _loss(config, mesh, params, batch):
  return loss_and_grads(_recipe(config, mesh).loss_fn, mesh, params, batch)


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_loss_matches_numpy_with_mined_columns(params):
  config, batch = _config(), _batch()
  mesh = one_device_mesh()
  out = _loss(config, mesh, params, batch)
  loss, parts = out.loss, out.metrics
  student = towers(_recipe(config, mesh).modules[STUDENT].model)
  p = params[STUDENT]
  img = np.asarray(student.embed_image(p, batch["image"])[0], np.float64)
  txt = np.asarray(student.embed_text(p, batch["text_ids"], batch["text_mask"])[0], np.float64)
  neg_t = np.asarray(student.embed_text(p, batch["neg_text_ids"].reshape(B * K, L),
                                        batch["neg_text_mask"].reshape(B * K, L))[0], np.float64)
  neg_i = np.asarray(student.embed_image(p, batch["neg_image"].reshape(B * K, 56, 56, 1))[0],
                     np.float64)
  tau = float(parts["temperature"])
  rows = np.arange(B)

  def direction(q, pos, mined, owner):
    logits = np.concatenate([q @ pos.T, q @ mined.T], axis=1) / tau
    owner = owner.reshape(-1)
    drop = (owner[None, :] == rows[:, None]) | (owner[None, :] == MISSING)
    logits[:, B:][drop] = -np.inf
    return -_log_softmax(logits)[rows, rows].mean()

  i2t = direction(img, txt, neg_t, batch["neg_text_owner"])
  t2i = direction(txt, img, neg_i, batch["neg_image_owner"])
  np.testing.assert_allclose(loss, (i2t + t2i) / 2, rtol=1e-4)
  # Without mined negatives: plain in-batch InfoNCE, always a smaller loss here.
  assert _loss(_config(k=0), mesh, params, batch).loss < loss


def test_eight_devices_equal_one_device(params):
  batch = _batch(1)
  many = _loss(_config(), make_mesh(), params, batch)
  assert make_mesh().size == 8
  assert_devices_agree(many, _loss(_config(), one_device_mesh(), params, batch), loss_atol=0.0)


def test_config_needs_a_bank_for_hard_negatives():
  with pytest.raises(ConfigError, match="--config.dual.hard_negatives=2 needs --config.mining.bank_dir: "
                                        "mine a bank first"):
    validate(_config(k=2, bank_dir=""), 8)
  with pytest.raises(ConfigError, match="--config.dual.hard_negatives=40 exceeds --config.mining."
                                        "num_neighbors=16: lower it"):
    validate(_config(k=40, bank_dir="/tmp"), 8)
  validate(_config(k=0), 8)
  methods.validate(_config(k=0))   # the dual recipe has no section checks and reads no teacher


# --- pipeline ------------------------------------------------------------------------------------

N = 32


@pytest.fixture(scope="module")
def split():
  return build_benchmark(load_fashion_mnist(), seed=0, num_train=N, num_val=8, num_test=8)["train"]


def _bank(tmp_path, split):
  """Image i's negatives: captions (i+1) % N slot 2 and (i+2) % N slot 3; caption (i, c)'s
  negatives: images (i+3) % N and an id outside the split (counted, masked)."""
  ids = split.image_ids.astype(np.int64)
  nxt = lambda j: ids[(np.arange(N) + j) % N]
  write_bank(str(tmp_path / I2T_FILE), ids,
             np.stack([caption_ids(nxt(1), 2, 5), caption_ids(nxt(2), 3, 5)], 1),
             np.ones((N, 2), np.float32))
  keys = caption_ids(np.repeat(ids, 5), np.tile(np.arange(5), N), 5)
  write_bank(str(tmp_path / T2I_FILE), keys,
             np.stack([np.repeat(nxt(3), 5), np.full(5 * N, 10**6)], 1), np.ones((5 * N, 2)))
  return tmp_path


def test_pipeline_attaches_banked_negatives_and_resumes(tmp_path, split):
  tokens = np.arange(N * 5 * L, dtype=np.int32).reshape(N, 5, L)
  masks = (tokens % 3 > 0).astype(np.int32)
  negatives = training_negatives(_config(bank_dir=str(_bank(tmp_path, split))), split.image_ids, 5)
  ds = pipeline.train_dataset(split, tokens, masks, global_batch_size=16, group_size=4, seed=0,
                              negatives=negatives)
  it = iter(ds)
  first = next(it)
  state = it.get_state()
  second = next(it)
  example = first["image_id"] - split.image_ids[0]
  assert first["neg_text_ids"].shape == (16, K, L) and first["neg_image"].shape == (16, K, 56, 56, 1)
  for j, (shift, slot) in enumerate(((1, 2), (2, 3))):
    neighbour = (example + shift) % N
    np.testing.assert_array_equal(first["neg_text_ids"][:, j], tokens[neighbour, slot])
    np.testing.assert_array_equal(first["neg_text_mask"][:, j], masks[neighbour, slot])
    np.testing.assert_array_equal(first["neg_text_owner"][:, j], split.image_ids[neighbour])
  np.testing.assert_array_equal(first["neg_image"][:, 0],
                                normalize_images(split.images[(example + 3) % N]))
  np.testing.assert_array_equal(first["neg_image_owner"][:, 0], split.image_ids[(example + 3) % N])
  assert (first["neg_image_owner"][:, 1] == MISSING).all()     # id outside the split: masked
  it2 = iter(ds)
  it2.set_state(state)
  resumed = next(it2)
  for key in second:
    np.testing.assert_array_equal(resumed[key], second[key], err_msg=key)


def test_bank_of_other_data_is_refused(tmp_path, split):
  write_bank(str(tmp_path / I2T_FILE), [10**7], [[1, 2]], [[0.0, 0.0]])
  write_bank(str(tmp_path / T2I_FILE), [10**7], [[1, 2]], [[0.0, 0.0]])
  with pytest.raises(BankError, match="--config.mining.bank_dir=.* covers none"):
    training_negatives(_config(bank_dir=str(tmp_path)), split.image_ids, 5)
  assert training_negatives(_config(k=0, bank_dir=str(tmp_path)), split.image_ids, 5) is None
