"""Listwise distillation (LoopITR eq. 5-7) and KL distillation: numpy, hand-worked, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.losses.distillation import kl_divergence, listwise_distillation


def _np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _np_listwise(student, teacher, tau):
  """Eq. 5-7 per row: -sum_k q_k log p_k, p = softmax(s / tau), q = softmax(h / tau); mean."""
  p, q = _np_softmax(student / tau), _np_softmax(teacher / tau)
  return -(q * np.log(p)).sum(axis=-1).mean()


def _scores(seed, shape=(4, 5)):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape), rng.normal(size=shape) * 3


def test_listwise_matches_numpy():
  student, teacher = _scores(0)
  loss, parts = listwise_distillation(jnp.asarray(student, jnp.float32),
                                      jnp.asarray(teacher, jnp.float32), 0.3)
  np.testing.assert_allclose(loss, _np_listwise(student, teacher, 0.3), rtol=1e-5)
  p, q = _np_softmax(student / 0.3), _np_softmax(teacher / 0.3)
  np.testing.assert_allclose(parts["distill_kl"], (q * np.log(q / p)).sum(-1).mean(), rtol=1e-5)


def test_listwise_hand_worked_single_negative():
  # m = 1, tau = 1. Student [log 3, 0] -> p = [3/4, 1/4]; teacher [0, 0] -> q = [1/2, 1/2].
  # H(q, p) = -(1/2) log(3/4) - (1/2) log(1/4) = (1/2) log(16/3).
  # KL(q || p) = (1/2) log((1/2)/(3/4)) + (1/2) log((1/2)/(1/4)) = (1/2) log(4/3).
  loss, parts = listwise_distillation(jnp.array([[math.log(3.0), 0.0]]), jnp.zeros((1, 2)), 1.0)
  np.testing.assert_allclose(loss, 0.5 * math.log(16 / 3), rtol=1e-6)
  np.testing.assert_allclose(parts["distill_kl"], 0.5 * math.log(4 / 3), rtol=1e-6)


def test_listwise_all_equal_scores_give_log_list_length():
  loss, parts = listwise_distillation(jnp.full((3, 4), 0.2), jnp.full((3, 4), -1.0), 0.05)
  np.testing.assert_allclose(loss, math.log(4), rtol=1e-6)
  np.testing.assert_allclose(parts["distill_kl"], 0.0, atol=1e-6)


def test_listwise_mask_equals_dropping_the_invalid_candidates():
  student, teacher = _scores(1, (2, 4))
  valid = np.array([[True, True, False, True], [True, False, False, True]])
  fn = lambda s, t: listwise_distillation(s, t, 0.5, stop_gradient=False,
                                          valid=jnp.asarray(valid))[0]
  loss, (g_student, g_teacher) = jax.value_and_grad(fn, argnums=(0, 1))(
      jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
  per_row = [_np_listwise(student[r:r + 1, valid[r]], teacher[r:r + 1, valid[r]], 0.5)
             for r in range(2)]
  np.testing.assert_allclose(loss, np.mean(per_row), rtol=1e-5)
  for g in (g_student, g_teacher):
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~valid], 0.0)


def test_listwise_student_gradient_is_p_minus_q_over_tau():
  student, teacher = _scores(2)
  tau, n = 0.4, student.shape[0]
  grad = jax.grad(lambda s: listwise_distillation(s, jnp.asarray(teacher, jnp.float32), tau)[0])(
      jnp.asarray(student, jnp.float32))
  expected = (_np_softmax(student / tau) - _np_softmax(teacher / tau)) / tau / n
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_stop_gradient_blocks_teacher_gradient_only_when_asked():
  student, teacher = _scores(3)
  tau, n = 0.4, student.shape[0]

  def grad_teacher(stop):
    return jax.grad(lambda t: listwise_distillation(jnp.asarray(student), t, tau, stop)[0])(
        jnp.asarray(teacher))

  np.testing.assert_array_equal(grad_teacher(True), 0.0)
  # Without stop-grad: dH/dh_j = -(1/tau) q_j (log p_j - sum_k q_k log p_k), per row, / n.
  p, q = _np_softmax(student / tau), _np_softmax(teacher / tau)
  log_p = np.log(p)
  expected = -q * (log_p - (q * log_p).sum(-1, keepdims=True)) / tau / n
  with jax.enable_x64(True):   # float64: the terms cancel, float32 leaves ~1e-6 of noise
    got = grad_teacher(False)
  assert np.abs(got).max() > 1e-3
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_listwise_temperature_gradient_matches_finite_differences():
  student, teacher = _scores(4)
  tau, eps = 0.5, 1e-6

  def np_loss(t, teacher_tau):   # the teacher's tau is held fixed under stop-grad
    q = _np_softmax(teacher / teacher_tau)
    return -(q * np.log(_np_softmax(student / t))).sum(-1).mean()

  with jax.enable_x64(True):
    for stop in (True, False):
      grad = jax.grad(lambda t: listwise_distillation(jnp.asarray(student), jnp.asarray(teacher),
                                                      t, stop)[0])(tau)
      if stop:
        numeric = (np_loss(tau + eps, tau) - np_loss(tau - eps, tau)) / (2 * eps)
      else:
        numeric = (np_loss(tau + eps, tau + eps) - np_loss(tau - eps, tau - eps)) / (2 * eps)
      np.testing.assert_allclose(grad, numeric, rtol=1e-6)


def _np_kl(student, teacher, tau):
  p, q = _np_softmax(student / tau), _np_softmax(teacher / tau)
  return (q * (np.log(q) - np.log(p))).sum(-1).mean(), -(q * np.log(p)).sum(-1).mean()


def test_kl_matches_numpy_with_leading_axes():
  student, teacher = _scores(5, (2, 3, 6))
  loss, parts = kl_divergence(jnp.asarray(student, jnp.float32),
                              jnp.asarray(teacher, jnp.float32), 2.0)
  kl, ce = _np_kl(student, teacher, 2.0)
  np.testing.assert_allclose(loss, kl, rtol=1e-5)
  np.testing.assert_allclose(parts["kd_cross_entropy"], ce, rtol=1e-5)


def test_kl_hand_worked_and_zero_for_equal_distributions():
  # Same numbers as the listwise case: KL([1/2, 1/2] || [3/4, 1/4]) = (1/2) log(4/3).
  loss, _ = kl_divergence(jnp.array([[math.log(3.0), 0.0]]), jnp.zeros((1, 2)), 1.0)
  np.testing.assert_allclose(loss, 0.5 * math.log(4 / 3), rtol=1e-6)
  same, _ = kl_divergence(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[11.0, 12.0, 13.0]]), 1.0)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_kl_gradients_student_p_minus_q_teacher_zero():
  student, teacher = _scores(6)
  tau, n = 3.0, student.shape[0]
  g_student, g_teacher = jax.grad(lambda s, t: kl_divergence(s, t, tau)[0], argnums=(0, 1))(
      jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
  expected = (_np_softmax(student / tau) - _np_softmax(teacher / tau)) / tau / n
  np.testing.assert_allclose(g_student, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(g_teacher, 0.0)
