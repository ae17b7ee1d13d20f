"""DINO loss and centre update (Caron et al. 2021, Algorithm 1) against a plain numpy
transcription of Algorithm 1, hand-worked values and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from conftest import check_finite_differences
from jaxdistill.losses.dino import dino_loss, teacher_distribution, update_center

TPS, TPT, M = 0.1, 0.04, 0.9   # the paper's student / teacher temperatures, centre momentum


# --- Algorithm 1, transcribed line by line in numpy ----------------------------------------------

def _np_softmax(x):
  e = np.exp(x - x.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _np_H(t, s, C, tps, tpt):
  """def H(t, s): t = t.detach(); s = softmax(s / tps, dim=1);
  t = softmax((t - C) / tpt, dim=1); return - (t * log(s)).sum(dim=1).mean()"""
  s = _np_softmax(s / tps)
  t = _np_softmax((t - C) / tpt)
  return -(t * np.log(s)).sum(axis=1).mean()


def _np_algorithm1(s1, s2, t1, t2, C, tps=TPS, tpt=TPT, m=M):
  """loss = H(t1, s2)/2 + H(t2, s1)/2; C = m*C + (1-m)*cat([t1, t2]).mean(dim=0)."""
  loss = _np_H(t1, s2, C, tps, tpt) / 2 + _np_H(t2, s1, C, tps, tpt) / 2
  new_C = m * C + (1 - m) * np.concatenate([t1, t2]).mean(axis=0)
  return loss, new_C


def _random_case(seed, b=5, k=7):
  rng = np.random.default_rng(seed)
  s1, s2, t1, t2 = (rng.normal(size=(b, k)) * 0.5 for _ in range(4))
  C = rng.normal(size=k) * 0.2
  return s1, s2, t1, t2, C


def test_loss_and_centre_match_algorithm_1():
  for seed in range(3):
    s1, s2, t1, t2, C = _random_case(seed)
    expected_loss, expected_C = _np_algorithm1(s1, s2, t1, t2, C)
    f32 = lambda *xs: jnp.asarray(np.stack(xs), jnp.float32)
    loss, parts = dino_loss(f32(s1, s2), f32(t1, t2), jnp.asarray(C, jnp.float32), TPS, TPT)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(parts["dino"], expected_loss, rtol=1e-5)
    new_C = update_center(jnp.asarray(C, jnp.float32), f32(t1, t2), M)
    np.testing.assert_allclose(new_C, expected_C, rtol=1e-5, atol=1e-7)


def test_more_views_average_every_ordered_pair_of_different_views():
  rng = np.random.default_rng(4)
  v, b, k = 3, 4, 6
  s, t, C = rng.normal(size=(v, b, k)), rng.normal(size=(v, b, k)), rng.normal(size=k)
  pairs = [(i, j) for i in range(v) for j in range(v) if i != j]
  expected = np.mean([_np_H(t[i], s[j], C, TPS, TPT) for i, j in pairs])
  loss, _ = dino_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                      jnp.asarray(C, jnp.float32), TPS, TPT)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_hand_worked_two_prototypes():
  # Teacher logits equal to the centre: P_t = [1/2, 1/2]. Student logits / tau_s = [log 3, 0]:
  # P_s = [3/4, 1/4]. H = -(1/2 log 3/4 + 1/2 log 1/4) = 1/2 log(16/3) for both pairs.
  s = jnp.full((2, 1, 2), 0.0).at[:, :, 0].set(TPS * math.log(3.0))
  t = jnp.full((2, 1, 2), 0.3)
  loss, parts = dino_loss(s, t, jnp.array([0.3, 0.3]), TPS, TPT)
  np.testing.assert_allclose(loss, 0.5 * math.log(16 / 3), rtol=1e-6)
  np.testing.assert_allclose(parts["teacher_entropy"], math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(parts["kl"], 0.5 * math.log(16 / 3) - math.log(2.0), rtol=1e-5)
  # The centre: 0.9 * C + 0.1 * (the teacher logits' mean, [0.3, 0.3]) from C = [0, 1].
  np.testing.assert_allclose(update_center(jnp.array([0.0, 1.0]), t, 0.9), [0.03, 0.93],
                             rtol=1e-6)


def test_uniform_outputs_give_log_k_and_sharpening_picks_the_teacher_argmax():
  k = 8
  loss, parts = dino_loss(jnp.zeros((2, 3, k)), jnp.ones((2, 3, k)), jnp.zeros(k), TPS, TPT)
  np.testing.assert_allclose(loss, math.log(k), rtol=1e-6)
  np.testing.assert_allclose(parts["teacher_entropy"], math.log(k), rtol=1e-6)
  # A teacher margin of 1 at tau_t = 0.04 is e^25 : 1, a one-hot P_t for float32.
  t = jnp.zeros((2, 1, k)).at[:, 0, 5].set(1.0)
  p_t = teacher_distribution(t, jnp.zeros(k), TPT)
  np.testing.assert_allclose(p_t[:, 0, 5], 1.0, rtol=1e-6)
  s = jnp.asarray(np.random.default_rng(5).normal(size=(2, 1, k)), jnp.float32)
  loss, _ = dino_loss(s, t, jnp.zeros(k), TPS, TPT)
  expected = -np.mean([jax.nn.log_softmax(s[v, 0] / TPS)[5] for v in range(2)])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_centring_removes_a_constant_shift_of_the_teacher():
  s1, s2, t1, t2, C = _random_case(6)
  s, t = jnp.asarray(np.stack([s1, s2]), jnp.float32), jnp.asarray(np.stack([t1, t2]), jnp.float32)
  shift = jnp.asarray(np.random.default_rng(7).normal(size=C.shape), jnp.float32)
  base, _ = dino_loss(s, t, jnp.asarray(C, jnp.float32), TPS, TPT)
  moved, _ = dino_loss(s, t + shift, jnp.asarray(C, jnp.float32) + shift, TPS, TPT)
  np.testing.assert_allclose(moved, base, rtol=1e-5)


def test_gradient_reaches_the_student_only_and_is_softmax_minus_teacher():
  s1, s2, t1, t2, C = _random_case(8, b=3, k=5)
  s = jnp.asarray(np.stack([s1, s2]), jnp.float32)
  t = jnp.asarray(np.stack([t1, t2]), jnp.float32)
  c = jnp.asarray(C, jnp.float32)
  g_s, g_t, g_c = jax.grad(lambda s, t, c: dino_loss(s, t, c, TPS, TPT)[0],
                           argnums=(0, 1, 2))(s, t, c)
  np.testing.assert_array_equal(g_t, 0.0)   # sg(teacher): Algorithm 1's t.detach()
  np.testing.assert_array_equal(g_c, 0.0)
  # view v' of the student pairs with teacher view 1 - v': dH/ds = (P_s - P_t) / tau_s, averaged
  # over B rows and the 2 pairs.
  for v in range(2):
    p_s = _np_softmax(np.asarray(s[v], np.float64) / TPS)
    p_t = _np_softmax((np.asarray(t[1 - v], np.float64) - C) / TPT)
    np.testing.assert_allclose(g_s[v], (p_s - p_t) / (TPS * 3 * 2), rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences():
  s1, s2, t1, t2, C = _random_case(9, b=2, k=3)
  with jax.enable_x64(True):
    t = jnp.asarray(np.stack([t1, t2]))
    fn = lambda s: dino_loss(s, t, jnp.asarray(C), TPS, TPT)[0]
    s = np.stack([s1, s2])
    grad = jax.grad(fn)(jnp.asarray(s))
    check_finite_differences(fn, [s], [grad])


def test_centre_update_has_no_gradient_and_keeps_float32():
  t = jnp.asarray(np.random.default_rng(10).normal(size=(2, 4, 3)), jnp.bfloat16)
  c = update_center(jnp.zeros(3), t, 0.9)
  assert c.dtype == jnp.float32
  np.testing.assert_allclose(c, 0.1 * np.asarray(t, np.float32).reshape(-1, 3).mean(0), rtol=1e-6)
  g = jax.grad(lambda t: update_center(jnp.zeros(3), t, 0.9).sum())(t.astype(jnp.float32))
  np.testing.assert_array_equal(g, 0.0)
