"""ITM (LoopITR eq. 4) and MLM losses against numpy, hand-worked values and analytic gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.losses.matching import itm_loss, mlm_loss


def _np_log_softmax(x):
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_itm_matches_numpy():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(9, 2)) * 2, rng.integers(0, 2, size=9).astype(np.int32)
  loss, parts = itm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  expected = -_np_log_softmax(logits)[np.arange(9), labels].mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(parts["itm_acc"], (logits.argmax(-1) == labels).mean(), rtol=1e-6)


def test_itm_hand_worked():
  # positive pair [log 3, 0] (label 0): p[0] = 3/4, CE = log(4/3), predicted right.
  # negative pair [0, 0] (label 1): p[1] = 1/2, CE = log 2; argmax picks class 0 -> wrong.
  loss, parts = itm_loss(jnp.array([[math.log(3.0), 0.0], [0.0, 0.0]]), jnp.array([0, 1]))
  np.testing.assert_allclose(loss, (math.log(4 / 3) + math.log(2.0)) / 2, rtol=1e-6)
  np.testing.assert_allclose(parts["itm_acc"], 0.5)


def test_itm_gradient_is_softmax_minus_onehot():
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(size=(5, 2)), np.array([0, 1, 1, 0, 1], np.int32)
  grad = jax.grad(lambda x: itm_loss(x, jnp.asarray(labels))[0])(jnp.asarray(logits, jnp.float32))
  softmax = np.exp(_np_log_softmax(logits))
  np.testing.assert_allclose(grad, (softmax - np.eye(2)[labels]) / 5, rtol=1e-5, atol=1e-7)


def _mlm_inputs(seed, vocab=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(2, 5, vocab)) * 2
  weights = (rng.random((2, 5)) < 0.5).astype(np.float32)
  weights[0, 0] = 1.0
  labels = rng.integers(0, vocab, size=(2, 5)).astype(np.int32)
  labels[weights == 0] = -100   # ignore-index labels on unmasked positions must not matter
  return logits, labels, weights


def test_mlm_matches_numpy_over_masked_positions_only():
  logits, labels, weights = _mlm_inputs(2)
  loss, parts = mlm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                         jnp.asarray(weights))
  sel = weights > 0
  nll = -_np_log_softmax(logits[sel])[np.arange(sel.sum()), labels[sel]]
  np.testing.assert_allclose(loss, nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(parts["mlm_acc"], (logits[sel].argmax(-1) == labels[sel]).mean())


def test_mlm_hand_worked():
  # One masked token with logits [log 3, 0, 0] and label 0: p = 3/5, CE = log(5/3), correct.
  # The unmasked token's huge loss must not count.
  logits = jnp.array([[[math.log(3.0), 0.0, 0.0], [-50.0, 50.0, 0.0]]])
  loss, parts = mlm_loss(logits, jnp.array([[0, 0]]), jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose(loss, math.log(5 / 3), rtol=1e-6)
  np.testing.assert_allclose(parts["mlm_acc"], 1.0)


def test_mlm_without_masked_tokens_is_zero_not_nan():
  logits, labels, _ = _mlm_inputs(3)
  weights = jnp.zeros((2, 5))
  (loss, parts), grad = jax.value_and_grad(
      lambda x: mlm_loss(x, jnp.asarray(labels), weights), has_aux=True)(
          jnp.asarray(logits, jnp.float32))
  assert float(loss) == 0.0 and float(parts["mlm_acc"]) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_mlm_gradient_is_weighted_softmax_minus_onehot():
  logits, labels, weights = _mlm_inputs(4)
  grad = jax.grad(lambda x: mlm_loss(x, jnp.asarray(labels), jnp.asarray(weights > 0))[0])(
      jnp.asarray(logits, jnp.float32))
  onehot = np.eye(7)[np.where(weights > 0, labels, 0)]
  expected = weights[..., None] * (np.exp(_np_log_softmax(logits)) - onehot) / weights.sum()
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
