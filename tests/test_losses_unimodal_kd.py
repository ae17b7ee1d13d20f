"""Paper 004 §3.4 KD loss (student queries vs teacher keys + memory bank) against a numpy
transcription, hand-worked values, the key mask's edge cases and finite-difference gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import check_finite_differences
from jaxdistill.losses.unimodal_kd import (kd_contrastive_loss, kd_key_mask, kd_logits,
                                           project_and_normalize, unimodal_kd_loss)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_kd_term(student, teacher, bank, row_ids, teacher_ids, bank_ids, bank_valid, positives,
                tau):
  """Loops over rows and keys: -log exp(s_pos) / sum_{kept k} exp(s_k), mean over rows."""
  batch_ids = set(int(i) for i in teacher_ids)
  losses = []
  for r in range(len(student)):
    kept = []       # logits of the keys in row r's softmax
    positive = None
    for c in range(len(teacher)):
      s = float(np.dot(student[r], teacher[c])) / tau
      if c == positives[r]:
        positive = s
        kept.append(s)
      elif teacher_ids[c] != row_ids[r]:
        kept.append(s)
    for j in range(len(bank)):
      if bank_valid[j] and bank_ids[j] != row_ids[r] and int(bank_ids[j]) not in batch_ids:
        kept.append(float(np.dot(student[r], bank[j])) / tau)
    total = sum(math.exp(s) for s in kept)
    losses.append(-(positive - math.log(total)))
  return sum(losses) / len(losses)


def _random_case(seed=0, b=6, n=10, e=5):
  """A batch with a duplicate image (rows 1 and 4 both id 11), a bank partly filled (slots 7..9
  invalid, ids -1), bank entries holding batch images (ids 10, 11, 13) and two copies of one
  image not in the batch (id 50, kept as negatives)."""
  rng = np.random.default_rng(seed)
  z_image, z_text, z_teacher = (_unit(rng.normal(size=(b, e))) for _ in range(3))
  bank = _unit(rng.normal(size=(n, e)))
  image_ids = np.array([10, 11, 12, 13, 11, 14], np.int32)[:b]
  bank_ids = np.array([50, 10, 51, 11, 50, 13, 52, -1, -1, -1], np.int32)[:n]
  bank_valid = np.arange(n) < 7
  return z_image, z_text, z_teacher, bank, image_ids, bank_ids, bank_valid


def test_mask_follows_the_rules():
  *_, image_ids, bank_ids, bank_valid = _random_case()
  mask = np.asarray(kd_key_mask(jnp.asarray(image_ids), jnp.asarray(image_ids),
                                jnp.asarray(bank_ids), jnp.asarray(bank_valid),
                                jnp.arange(6)))
  assert mask.shape == (6, 16)
  batch, bank = mask[:, :6], mask[:, 6:]
  expected_batch = np.ones((6, 6), bool)
  expected_batch[1, 4] = expected_batch[4, 1] = False     # the duplicate's other copy
  np.testing.assert_array_equal(batch, expected_batch)
  # bank: ids 50, 51, 50, 52 kept for every row (not in the batch); 10, 11, 13 (copies of batch
  # keys) and the invalid slots never.
  np.testing.assert_array_equal(bank, np.tile([1, 0, 1, 0, 1, 0, 1, 0, 0, 0], (6, 1)).astype(bool))


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_matches_numpy_transcription(tau):
  z_image, z_text, z_teacher, bank, image_ids, bank_ids, bank_valid = _random_case(1)
  positives = np.arange(6)
  f = jax.jit(unimodal_kd_loss)
  loss, parts = f(*map(jnp.asarray, (z_image, z_text, z_teacher, bank, image_ids, bank_ids,
                                     bank_valid)), jnp.asarray(tau, jnp.float32))
  args = (z_teacher, bank, image_ids, image_ids, bank_ids, bank_valid, positives, tau)
  kd_image, kd_text = _np_kd_term(z_image, *args), _np_kd_term(z_text, *args)
  np.testing.assert_allclose(parts["kd_image"], kd_image, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(parts["kd_text"], kd_text, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, kd_image + kd_text, rtol=1e-5, atol=1e-5)
  # negatives per row: 5 in-batch (4 for the duplicated rows 1 and 4) + 4 bank entries.
  np.testing.assert_allclose(parts["kd_negatives"], (4 * 9 + 2 * 8) / 6, rtol=1e-6)


def test_local_rows_against_global_keys_match_the_full_batch():
  # Two "devices" of 3 rows each: positive_columns = the rows' global indices.
  z_image, _, z_teacher, bank, image_ids, bank_ids, bank_valid = _random_case(2)
  full, _ = kd_contrastive_loss(*map(jnp.asarray, (z_image, z_teacher, bank, image_ids,
                                                   image_ids, bank_ids, bank_valid)),
                                jnp.arange(6), 0.1)
  local = []
  for rows in (slice(0, 3), slice(3, 6)):
    loss, _ = kd_contrastive_loss(jnp.asarray(z_image[rows]), jnp.asarray(z_teacher),
                                  jnp.asarray(bank), jnp.asarray(image_ids[rows]),
                                  jnp.asarray(image_ids), jnp.asarray(bank_ids),
                                  jnp.asarray(bank_valid), jnp.arange(6)[rows], 0.1)
    positives = np.arange(6)[rows]
    np.testing.assert_allclose(loss, _np_kd_term(z_image[rows], z_teacher, bank, image_ids[rows],
                                                 image_ids, bank_ids, bank_valid, positives, 0.1),
                               rtol=1e-5)
    local.append(loss)
  np.testing.assert_allclose(np.mean(local), full, rtol=1e-6)


def test_logits_values_and_excluded_keys_are_minus_inf():
  z_image, _, z_teacher, bank, image_ids, bank_ids, bank_valid = _random_case(3)
  logits = np.asarray(kd_logits(*map(jnp.asarray, (z_image, z_teacher, bank, image_ids,
                                                   image_ids, bank_ids, bank_valid)),
                                jnp.arange(6), 0.25))
  mask = np.asarray(kd_key_mask(jnp.asarray(image_ids), jnp.asarray(image_ids),
                                jnp.asarray(bank_ids), jnp.asarray(bank_valid), jnp.arange(6)))
  expected = z_image @ np.concatenate([z_teacher, bank]).T / 0.25
  np.testing.assert_allclose(logits[mask], expected[mask], rtol=1e-5, atol=1e-6)
  assert np.all(np.isneginf(logits[~mask]))


def test_hand_worked_two_by_two_empty_bank():
  empty, no_ids = jnp.zeros((0, 2)), jnp.zeros((0,), jnp.int32)
  ids = jnp.array([0, 1], jnp.int32)
  # Identical features everywhere: all logits equal -> each term is log B, L_kd = 2 log 2.
  same = jnp.ones((2, 2)) / math.sqrt(2.0)
  loss, parts = unimodal_kd_loss(same, same, same, empty, ids, no_ids, jnp.zeros((0,), bool), 0.07)
  np.testing.assert_allclose(parts["kd_image"], math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(loss, 2 * math.log(2.0), rtol=1e-6)
  # Orthonormal teacher e1, e2; image = teacher: row logits [1/tau, 0] -> CE log(1 + e^{-1/tau});
  # text = swapped: row logits [0, 1/tau] -> CE log(1 + e^{1/tau}).
  tau = 0.5
  eye = jnp.eye(2)
  loss, parts = unimodal_kd_loss(eye, eye[::-1], eye, empty, ids, no_ids, jnp.zeros((0,), bool),
                                 tau)
  np.testing.assert_allclose(parts["kd_image"], math.log1p(math.exp(-1 / tau)), rtol=1e-6)
  np.testing.assert_allclose(parts["kd_text"], math.log1p(math.exp(1 / tau)), rtol=1e-6)
  np.testing.assert_allclose(parts["kd_negatives"], 1.0)


def test_bank_of_the_current_batch_equals_the_empty_bank():
  z_image, z_text, z_teacher, _, image_ids, _, _ = _random_case(4)
  image_ids = np.arange(20, 26, dtype=np.int32)
  empty = (jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool))
  itself = (jnp.asarray(z_teacher), jnp.asarray(image_ids), jnp.ones((6,), bool))
  base = tuple(map(jnp.asarray, (z_image, z_text, z_teacher)))
  loss_empty, parts_empty = unimodal_kd_loss(*base, empty[0], jnp.asarray(image_ids), *empty[1:])
  loss_self, parts_self = unimodal_kd_loss(*base, itself[0], jnp.asarray(image_ids), *itself[1:])
  np.testing.assert_allclose(loss_self, loss_empty, rtol=1e-6)
  np.testing.assert_allclose(parts_self["kd_negatives"], 5.0)
  # A bank entry of another image does change the loss.
  other = (jnp.asarray(z_teacher), jnp.asarray(image_ids + 100), jnp.ones((6,), bool))
  loss_other, _ = unimodal_kd_loss(*base, other[0], jnp.asarray(image_ids), *other[1:])
  assert float(loss_other) > float(loss_empty) + 1e-3


def test_row_with_only_its_positive_has_zero_loss_and_finite_grads():
  rng = np.random.default_rng(5)
  student = jnp.asarray(_unit(rng.normal(size=(3, 4))), jnp.float32)
  teacher = jnp.asarray(_unit(rng.normal(size=(3, 4))), jnp.float32)
  bank = jnp.asarray(_unit(rng.normal(size=(4, 4))), jnp.float32)
  ids = jnp.array([7, 7, 7], jnp.int32)                   # three copies of one image
  bank_ids = jnp.array([7, 7, -1, -1], jnp.int32)
  bank_valid = jnp.array([True, True, False, False])

  def loss(student):
    return kd_contrastive_loss(student, teacher, bank, ids, ids, bank_ids, bank_valid,
                               jnp.arange(3), 0.07)

  (value, parts), grad = jax.value_and_grad(loss, has_aux=True)(student)
  assert float(value) == 0.0
  assert float(parts["negatives"]) == 0.0
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(6)
  z_image, z_text, z_teacher, bank, image_ids, bank_ids, bank_valid = _random_case(6, b=4, n=6,
                                                                                   e=3)
  with jax.enable_x64(True):
    frozen = tuple(map(jnp.asarray, (z_teacher, bank, image_ids, bank_ids, bank_valid)))

    def on_features(z_image, z_text):
      teacher, bank_, ids, bids, valid = frozen
      return unimodal_kd_loss(z_image, z_text, teacher, bank_, ids, bids, valid, 0.2)[0]

    args = (jnp.asarray(z_image), jnp.asarray(z_text))
    grads = jax.grad(on_features, argnums=(0, 1))(*args)
    check_finite_differences(jax.jit(on_features), args, grads, atol=1e-9)

    # Through the projection head and the normalisation: h [B, D] -> ||h W + b||.
    h_image, h_text = jnp.asarray(rng.normal(size=(4, 5))), jnp.asarray(rng.normal(size=(4, 5)))
    kernel, bias = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(3,)))

    def on_projection(h_image, h_text, kernel, bias):
      teacher, bank_, ids, bids, valid = frozen
      return unimodal_kd_loss(project_and_normalize(h_image, kernel, bias),
                              project_and_normalize(h_text, kernel, bias),
                              teacher, bank_, ids, bids, valid, 0.2)[0]

    args = (h_image, h_text, kernel, bias)
    grads = jax.grad(on_projection, argnums=(0, 1, 2, 3))(*args)
    check_finite_differences(jax.jit(on_projection), args, grads, atol=1e-9)


def test_teacher_and_bank_get_no_gradient():
  z_image, z_text, z_teacher, bank, image_ids, bank_ids, bank_valid = _random_case(7)
  grads = jax.grad(lambda t, q: unimodal_kd_loss(
      jnp.asarray(z_image), jnp.asarray(z_text), t, q, jnp.asarray(image_ids),
      jnp.asarray(bank_ids), jnp.asarray(bank_valid), 0.07)[0], argnums=(0, 1))(
          jnp.asarray(z_teacher), jnp.asarray(bank))
  for grad in grads:
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_project_and_normalize_gives_unit_rows():
  rng = np.random.default_rng(8)
  h, kernel = rng.normal(size=(3, 4)), rng.normal(size=(4, 2))
  z = np.asarray(project_and_normalize(jnp.asarray(h, jnp.bfloat16), jnp.asarray(kernel)))
  assert z.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
  z = np.asarray(project_and_normalize(jnp.asarray(h), jnp.asarray(kernel), jnp.ones(2)))
  np.testing.assert_allclose(z, _unit(h @ kernel + 1.0), rtol=1e-5, atol=1e-6)


def test_mismatched_shapes_are_rejected():
  z = jnp.zeros((3, 4))
  with pytest.raises(AssertionError):
    unimodal_kd_loss(z, z, z, jnp.zeros((2, 5)), jnp.arange(3), jnp.arange(2),
                     jnp.ones(2, bool), 0.07)
  with pytest.raises(AssertionError):
    unimodal_kd_loss(z, z, z, jnp.zeros((2, 4)), jnp.arange(2), jnp.arange(2),
                     jnp.ones(2, bool), 0.07)
  with pytest.raises(AssertionError):
    kd_contrastive_loss(z, z, jnp.zeros((2, 4)), jnp.arange(3), jnp.arange(3), jnp.arange(2),
                        jnp.ones(2, int), jnp.arange(3), 0.07)
