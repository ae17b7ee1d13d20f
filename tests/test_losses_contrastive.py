"""ITC loss (LoopITR eq. 2-3) against numpy transcriptions, hand-worked values and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import check_finite_differences
from jaxdistill.losses.contrastive import contrastive_loss, similarity_logits


def _np_row_ce(logits, positive_columns):
  """-log softmax(logits)[r, pos[r]], written out: log sum_j exp(l_rj) - l_r,pos."""
  m = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
  return lse - logits[np.arange(len(logits)), positive_columns]


def test_similarity_logits_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  i2t, t2i = similarity_logits(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 0.1)
  expected = np.einsum("id,jd->ij", img, txt) / 0.1
  np.testing.assert_allclose(i2t, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(t2i, expected.T, rtol=1e-5, atol=1e-5)


def test_row_wise_loss_matches_numpy_on_local_rows():
  # 3 local rows against 7 global columns, positives at arbitrary columns (a device's slice).
  rng = np.random.default_rng(1)
  i2t, t2i = rng.normal(size=(3, 7)) * 3, rng.normal(size=(3, 7)) * 3
  pos = np.array([4, 5, 6], np.int32)
  loss, parts = contrastive_loss(jnp.asarray(i2t, jnp.float32), jnp.asarray(t2i, jnp.float32),
                                 jnp.asarray(pos))
  ce_i2t, ce_t2i = _np_row_ce(i2t, pos).mean(), _np_row_ce(t2i, pos).mean()
  np.testing.assert_allclose(parts["itc_i2t"], ce_i2t, rtol=1e-5)
  np.testing.assert_allclose(parts["itc_t2i"], ce_t2i, rtol=1e-5)
  np.testing.assert_allclose(loss, (ce_i2t + ce_t2i) / 2, rtol=1e-5)


def test_hand_worked_two_by_two():
  # i2t row 0 = [log 3, 0]: p_pos = 3 / 4 -> CE = log(4/3); row 1 = [0, 0]: CE = log 2.
  # t2i all zero: CE = log 2 in both rows.  loss = (log(8/3) / 2 + log 2) / 2.
  i2t = jnp.array([[math.log(3.0), 0.0], [0.0, 0.0]])
  t2i = jnp.zeros((2, 2))
  loss, parts = contrastive_loss(i2t, t2i, jnp.arange(2))
  np.testing.assert_allclose(parts["itc_i2t"], math.log(8 / 3) / 2, rtol=1e-6)
  np.testing.assert_allclose(parts["itc_t2i"], math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(loss, (math.log(8 / 3) / 2 + math.log(2.0)) / 2, rtol=1e-6)


def test_all_equal_logits_give_log_batch():
  b = 6
  loss, _ = contrastive_loss(jnp.full((b, b), 2.5), jnp.full((b, b), -1.0), jnp.arange(b))
  np.testing.assert_allclose(loss, math.log(b), rtol=1e-6)


def test_gradient_is_softmax_minus_onehot():
  rng = np.random.default_rng(2)
  i2t, t2i = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  pos = np.array([0, 3, 1, 5], np.int32)
  grads = jax.grad(lambda a, b: contrastive_loss(a, b, jnp.asarray(pos))[0], argnums=(0, 1))(
      jnp.asarray(i2t, jnp.float32), jnp.asarray(t2i, jnp.float32))
  for logits, grad in zip((i2t, t2i), grads):
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.eye(6)[pos]
    np.testing.assert_allclose(grad, (softmax - onehot) / (2 * 4), rtol=1e-5, atol=1e-7)


def test_gradient_through_embeddings_and_temperature_matches_finite_differences():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    img, txt = jnp.asarray(rng.normal(size=(3, 2))), jnp.asarray(rng.normal(size=(3, 2)))
    tau = jnp.asarray(0.7)

    def loss(img, txt, tau):
      return contrastive_loss(*similarity_logits(img, txt, tau), jnp.arange(3))[0]

    grads = jax.grad(loss, argnums=(0, 1, 2))(img, txt, tau)
    check_finite_differences(loss, (img, txt, tau), grads, atol=1e-9)


def test_mismatched_shapes_are_rejected():
  with pytest.raises(AssertionError):
    contrastive_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.arange(3))
