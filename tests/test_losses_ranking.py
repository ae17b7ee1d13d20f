"""CPRD losses (paper 002) against plain numpy transcriptions of eq. 3, 4, 7 and hand-worked cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.losses import ranking


def _numpy_cprd(logits, negatives, k, scores_of, m):
  """Eq. 3-7 transcribed literally for one direction.

  scores_of(i, column) -> teacher score p, or None when the pair is not scored (invalid)."""
  losses = []
  for i in range(logits.shape[0]):
    cols = [c for c in range(logits.shape[1]) if negatives[i, c]]
    d = sorted(cols, key=lambda c: -logits[i, c])                 # eq. 3
    h = d[:k]
    p = {c: scores_of(i, c) for c in h}
    p = {c: (-math.inf if v is None else v) for c, v in p.items()}
    c_rank = sorted(h, key=lambda c: -p[c])                         # eq. 4
    j_star = next((j for j, c in enumerate(c_rank) if p[c] < m), len(c_rank))
    terms = []
    for j in range(j_star):
      den = sum(math.exp(logits[i, c]) for c in c_rank[j:]) + \
          sum(math.exp(logits[i, c]) for c in d[k:])
      terms.append(-logits[i, c_rank[j]] + math.log(den))
    losses.append(np.mean(terms) if terms else 0.0)
  return float(np.mean(losses))


def _jax_cprd(logits, negatives, k, scores_full, scored_full, m, valid_fn=None):
  hard, available = ranking.top_k_hard_negatives(logits, negatives, k)
  scores = jnp.take_along_axis(scores_full, hard, axis=1)
  scored = jnp.take_along_axis(scored_full, hard, axis=1) & available
  valid = ranking.threshold_valid(scores, scored, m) if valid_fn is None else valid_fn(scores, scored)
  return ranking.contrastive_partial_ranking_loss(logits, negatives, hard, available, scores, valid)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cprd_matches_numpy_on_random_inputs(seed):
  rng = np.random.default_rng(seed)
  r, c, k, m = 6, 20, 5, 0.5
  logits = rng.normal(size=(r, c)) * 3
  negatives = rng.random((r, c)) > 0.2
  negatives[np.arange(r), np.arange(r)] = False          # the positives
  scores = rng.random((r, c))
  scored = rng.random((r, c)) > 0.3
  expected = _numpy_cprd(logits, negatives, k,
                         lambda i, col: scores[i, col] if scored[i, col] else None, m)
  loss, parts = _jax_cprd(jnp.asarray(logits, jnp.float32), jnp.asarray(negatives), k,
                          jnp.asarray(scores, jnp.float32), jnp.asarray(scored), m)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert parts["cprd_valid"] > 0


def _one_row(logits, scores, m, k=2, negatives=None):
  logits = jnp.log(jnp.asarray([logits], jnp.float32))
  negatives = jnp.ones(logits.shape, bool) if negatives is None else jnp.asarray([negatives])
  scores = jnp.asarray([scores], jnp.float32)
  return _jax_cprd(logits, negatives, k, scores, jnp.ones(scores.shape, bool), m)[0]


def test_hand_worked_all_valid():
  # exp(s) = [4, 2, 1, 1]; top-2 = columns 0, 1. Teacher agrees (0.9 > 0.8):
  # L_0 = -ln 4 + ln(4+2+1+1) = ln 2, L_1 = -ln 2 + ln(2+1+1) = ln 2.
  np.testing.assert_allclose(_one_row([4, 2, 1, 1], [0.9, 0.8, 0, 0], 0.5), math.log(2), rtol=1e-6)
  # Teacher disagrees (column 1 first): L_1 = ln(8/2) = ln 4, L_0 = ln((4+1+1)/4) = ln 1.5.
  np.testing.assert_allclose(_one_row([4, 2, 1, 1], [0.8, 0.9, 0, 0], 0.5),
                             (math.log(4) + math.log(1.5)) / 2, rtol=1e-6)


def test_hand_worked_ties_put_each_other_in_the_denominator():
  # Equal teacher scores: L_0 = ln(8/4), L_1 = ln(8/2).
  np.testing.assert_allclose(_one_row([4, 2, 1, 1], [0.9, 0.9, 0, 0], 0.5),
                             (math.log(2) + math.log(4)) / 2, rtol=1e-6)


def test_hand_worked_one_valid_one_invalid():
  # Column 1 invalid (0.3 < m): only L_0 = -ln 4 + ln(4 + 2 + 1 + 1) = ln 2.
  np.testing.assert_allclose(_one_row([4, 2, 1, 1], [0.9, 0.3, 0, 0], 0.5), math.log(2), rtol=1e-6)


def test_all_invalid_gives_zero_loss_and_zero_finite_gradient():
  logits = jnp.log(jnp.asarray([[4.0, 2, 1, 1], [1, 1, 3, 1]]))
  negatives = jnp.ones(logits.shape, bool)
  scores = jnp.full(logits.shape, 0.2)

  def loss(x):
    return _jax_cprd(x, negatives, 2, scores, jnp.ones(logits.shape, bool), 0.5)[0]

  value, grad = jax.value_and_grad(loss)(logits)
  assert value == 0.0
  assert np.all(np.isfinite(grad)) and np.all(grad == 0)


def test_row_without_negatives_is_zero_not_nan():
  logits = jnp.zeros((2, 3))
  negatives = jnp.asarray([[False] * 3, [True, True, False]])
  scores = jnp.ones((2, 3))
  value, grad = jax.value_and_grad(
      lambda x: _jax_cprd(x, negatives, 4, scores, jnp.ones((2, 3), bool), 0.5)[0])(logits)
  # Row 0: nothing. Row 1: two tied valid negatives with equal logits: each L = ln 2.
  np.testing.assert_allclose(value, math.log(2) / 2, rtol=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(grad[0] == 0)


def test_k_larger_than_the_negatives_available():
  # Two negatives (columns 0, 1), K = 5: L_0 = ln((4+2)/4), L_1 = ln(2/2) = 0.
  value = _one_row([4, 2, 7, 1], [0.9, 0.8, 0.9, 0.9], 0.5, k=5,
                   negatives=[True, True, False, False])
  np.testing.assert_allclose(value, math.log(1.5) / 2, rtol=1e-6)
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 4))
  negatives = np.ones((3, 4), bool)
  scores = rng.random((3, 4))
  expected = _numpy_cprd(logits, negatives, 9, lambda i, col: scores[i, col], 0.3)
  got, _ = _jax_cprd(jnp.asarray(logits, jnp.float32), jnp.asarray(negatives), 9,
                     jnp.asarray(scores, jnp.float32), jnp.ones((3, 4), bool), 0.3)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_adaptive_m_star_keeps_exactly_the_top_scored_negative():
  scores = jnp.asarray([[0.1, 0.7, 0.3], [0.2, 0.2, 0.2], [0.9, 0.5, 0.4]])
  scored = jnp.asarray([[True, True, True], [True, True, True], [False, False, False]])
  valid = ranking.adaptive_valid(scores, scored)
  np.testing.assert_array_equal(valid, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
  # CPRD_m* on [4, 2, 1, 1] with the teacher preferring column 1: L = ln((2+4+1+1)/2) = ln 4.
  got = _jax_cprd(jnp.log(jnp.asarray([[4.0, 2, 1, 1]])), jnp.ones((1, 4), bool), 2,
                  jnp.asarray([[0.1, 0.2, 0, 0]]), jnp.ones((1, 4), bool), 0.0,
                  valid_fn=ranking.adaptive_valid)[0]
  np.testing.assert_allclose(got, math.log(4), rtol=1e-6)


def test_top_k_hard_negatives_skips_masked_columns():
  logits = jnp.asarray([[5.0, 4, 3, 2, 1]])
  idx, available = ranking.top_k_hard_negatives(logits, jnp.asarray([[False, True, False, True, True]]), 4)
  np.testing.assert_array_equal(idx[0, :3], [1, 3, 4])
  np.testing.assert_array_equal(available, [[True, True, True, False]])


def test_m3se_and_rm3se_hand_worked():
  student = jnp.asarray([[0.5, 0.4, 0.45, 0.1]])
  teacher = jnp.asarray([[0.9, 0.8, 0.1, 0.0]])
  scored = jnp.asarray([[True, True, True, False]])
  # hardest by teacher = column 1: margin ((0.5-0.4) - (0.9-0.8))^2 = 0;
  # column 2 above the hardest: (0.45 - 0.4)^2 = 0.0025; column 3 unscored.
  np.testing.assert_allclose(ranking.m3se_loss(student, teacher, scored)[0], 0.0025, rtol=1e-4)
  # Rescaled over columns 0-2: s = [1, 0, 0.5], t = [1, 7/8, 0]:
  # ((1 - 0) - (1 - 7/8))^2 = (7/8)^2, plus (0.5 - 0)^2.
  np.testing.assert_allclose(ranking.rm3se_loss(student, teacher, scored)[0],
                             (7 / 8) ** 2 + 0.25, rtol=1e-5)
  none = jnp.asarray([[True, False, False, False]])
  for fn in (ranking.m3se_loss, ranking.rm3se_loss):
    value, grad = jax.value_and_grad(lambda s: fn(s, teacher, none)[0])(student)
    assert value == 0.0 and np.all(np.isfinite(grad))


def test_kl_ranking_loss_matches_numpy_and_ignores_unscored():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  scored = np.ones((3, 5), bool)
  scored[1, 3:] = False
  tau = 0.5
  expected = []
  for i in range(3):
    keep = scored[i]
    p = np.exp(s[i, keep] / tau) / np.exp(s[i, keep] / tau).sum()
    q = np.exp(t[i, keep] / tau) / np.exp(t[i, keep] / tau).sum()
    expected.append(np.sum(q * np.log(q / p)))
  got, _ = ranking.kl_ranking_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                   jnp.asarray(scored), tau)
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)


def test_bank_lookup_marks_absent_pairs_unscored():
  bank_keys = jnp.asarray([[3, 5, -1], [0, 1, 2]])
  bank_scores = jnp.asarray([[0.9, 0.2, 0.0], [0.1, 0.2, 0.3]])
  scores, scored = ranking.bank_lookup(bank_keys, bank_scores, jnp.asarray([0, 1]),
                                       jnp.asarray([[5, 4], [2, -1]]))
  np.testing.assert_array_equal(scored, [[True, False], [True, False]])
  np.testing.assert_allclose(scores[scored], [0.2, 0.3])
