"""Ranking distillation from a teacher's scores on hard negatives (CPRD, Chen et al., paper 002).

Owns: top-K hard-negative mining by the student's similarities (eq. 3); the ranking target's
validity (eq. 4 + threshold m, or the adaptive m* of Table 5); the contrastive partial ranking
loss (eq. 6-7; eq. 8 averages its two directions in the recipe); the offline similarity-bank
lookup (§3.2.2); and the Table 5 baselines KL, M3SE and R-M3SE.

One direction at a time (image->text shown; text->image is the same call with the roles
swapped). Shapes: R query rows, C candidate columns (batch + queue keys), K hard negatives.
`logits` are student similarities divided by tau, `negatives` bool [R, C] marks the columns that
may serve as negatives of each row (not the positive, not a duplicate of it, not an empty queue
slot). Every loss returns (scalar, dict of named parts); a row without a usable (valid)
negative contributes zero, never NaN, in value and gradient.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxdistill.losses.distillation import kl_divergence

# Finite stand-in for -inf in masked log-sum-exps: exp(_NEG - x) underflows to 0 and, unlike
# -inf, gives no NaN in a row where every entry is masked.
_NEG = -1e30


def top_k_hard_negatives(logits: jax.Array, negatives: jax.Array,
                         k: int) -> tuple[jax.Array, jax.Array]:
  """Eq. 3, h_i: the k columns of highest student similarity among each row's negatives.

  logits [R, C], negatives bool [R, C]. Returns (indices int32 [R, k] in descending similarity,
  available bool [R, k]); when a row has fewer than k negatives (or C < k) the missing
  picks have available False (their index is meaningless). No gradient flows (indices only)."""
  chex.assert_rank([logits, negatives], 2)
  chex.assert_equal_shape([logits, negatives])
  if k < 1:
    raise ValueError(f"top_k_hard_negatives: k={k} must be >= 1 (set --config.cprd.num_hard)")
  scores = jnp.where(negatives, jax.lax.stop_gradient(logits).astype(jnp.float32), -jnp.inf)
  take = min(k, logits.shape[1])
  values, indices = jax.lax.top_k(scores, take)
  available = values > -jnp.inf
  if take < k:
    pad = ((0, 0), (0, k - take))
    indices, available = jnp.pad(indices, pad), jnp.pad(available, pad)
  return indices.astype(jnp.int32), available


def threshold_valid(scores: jax.Array, scored: jax.Array, m: float) -> jax.Array:
  """Eq. 4 + §3.2.2: a hard negative is valid when the teacher scored it (scored bool [R, K])
  and its score p >= m (scores [R, K]; invalid: p < m). Returns bool [R, K]."""
  chex.assert_equal_shape([scores, scored])
  return scored & (scores >= m)


def adaptive_valid(scores: jax.Array, scored: jax.Array) -> jax.Array:
  """CPRD_{m*} (Table 5): m adapted per row so that exactly one hard negative is valid, the
  teacher's top-scored one (first of equal maxima); rows with nothing scored get none.
  scores [R, K], scored bool [R, K] -> bool [R, K]."""
  chex.assert_equal_shape([scores, scored])
  best = jnp.argmax(jnp.where(scored, scores, -jnp.inf), axis=1)
  return jax.nn.one_hot(best, scores.shape[1], dtype=bool) & jnp.any(scored, axis=1, keepdims=True)


def contrastive_partial_ranking_loss(logits: jax.Array, negatives: jax.Array,
                                     hard: jax.Array, available: jax.Array, scores: jax.Array,
                                     valid: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 7 (one direction): for each valid hard negative j of row i,

    L_ij = -log exp(s_ij / tau) / (sum_{k ranked by the teacher at or after j} exp(s_ik / tau)
                                   + sum_{negatives outside the top-K} exp(s_ik / tau)),

  L^{I2T} = 1/R sum_i 1/(J_i* - 1) sum_{j valid} L_ij. The positive is in no denominator.

  logits [R, C] = s / tau; negatives bool [R, C]; hard int [R, K], available bool [R, K] from
  `top_k_hard_negatives`; scores [R, K] teacher scores of the hard negatives (no gradient);
  valid bool [R, K] from `threshold_valid` / `adaptive_valid`.
  Reading of eq. 4 / 7 used here: the teacher's ranking c_i sorts the hard negatives by score;
  valid ones come first (p >= m), so J_i* - 1 is the number of valid ones and every invalid or
  unscored hard negative is "ranked after" every valid one. With ties in the teacher's scores
  eq. 4's strict order is undefined; we put tied negatives in each other's denominators (no
  arbitrary order is imposed between equally scored negatives). Rows with no valid hard
  negative add 0 to the sum (still counted in 1/R, eq. 7).
  Returns (loss, {"cprd_valid": mean number of valid hard negatives per row})."""
  chex.assert_rank([logits, negatives, hard, available, scores, valid], [2, 2, 2, 2, 2, 2])
  chex.assert_equal_shape([logits, negatives])
  chex.assert_equal_shape([hard, available, scores, valid])
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  valid = valid & available
  rows = jnp.arange(logits.shape[0])[:, None]
  in_top_k = jnp.zeros(negatives.shape, bool).at[rows, hard].max(available)
  rest = jnp.where(negatives & ~in_top_k, logits, _NEG)
  rest_lse = jax.nn.logsumexp(rest, axis=1)                                       # [R]
  hard_logits = jnp.take_along_axis(logits, hard, axis=1)                          # [R, K]
  scores = jax.lax.stop_gradient(scores)
  # Teacher rank of k at or after j: k not valid (invalid negatives follow all valid ones),
  # or both valid and p_k <= p_j.
  after = available[:, None, :] & (~valid[:, None, :] | (scores[:, None, :] <= scores[:, :, None]))
  after = after & valid[:, :, None]                                               # [R, j, k]
  terms = jnp.concatenate([jnp.broadcast_to(rest_lse[:, None, None], (*valid.shape, 1)),
                           jnp.where(after, hard_logits[:, None, :], _NEG)], axis=2)
  denominator = jax.nn.logsumexp(terms, axis=2)                                   # [R, K]
  per_pair = jnp.where(valid, denominator - hard_logits, 0.0)
  num_valid = jnp.sum(valid, axis=1)
  per_row = jnp.sum(per_pair, axis=1) / jnp.maximum(num_valid, 1)
  return jnp.mean(per_row), {"cprd_valid": jnp.mean(num_valid.astype(jnp.float32))}


def kl_ranking_loss(student: jax.Array, teacher: jax.Array, scored: jax.Array,
                    temperature: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Table 5 "KL": KL(softmax(teacher / tau) || softmax(student / tau)) over each row's list of
  the positive (column 0) and its K hard negatives (Hinton KD as in LoopITR eq. 5-7 / Miech et
  al.; paper 002 §4.3). student [R, 1+K] similarities s (not divided by tau), teacher [R, 1+K]
  scores, scored bool [R, 1+K] (unscored negatives leave both softmaxes; column 0 is always
  kept). Returns (mean KL over rows, {"kd_cross_entropy"})."""
  chex.assert_equal_shape([student, teacher, scored])
  keep = scored.at[:, 0].set(True)
  masked = lambda x: jnp.where(keep, x.astype(jnp.float32), _NEG)
  return kl_divergence(masked(student), masked(teacher), temperature)


def _m3se(student: jax.Array, teacher: jax.Array, scored: jax.Array):
  """Shared body of M3SE / R-M3SE on [R, 1+K] lists (column 0 the positive)."""
  neg_scored = scored[:, 1:]
  has_neg = jnp.any(neg_scored, axis=1)
  hardest = jnp.argmax(jnp.where(neg_scored, teacher[:, 1:], -jnp.inf), axis=1)[:, None]
  s_hard = jnp.take_along_axis(student[:, 1:], hardest, axis=1)[:, 0]
  t_hard = jnp.take_along_axis(teacher[:, 1:], hardest, axis=1)[:, 0]
  margin = jnp.square((student[:, 0] - s_hard) - (teacher[:, 0] - t_hard))
  others = neg_scored & (jnp.arange(neg_scored.shape[1])[None, :] != hardest)
  above = jnp.where(others, jnp.square(jax.nn.relu(student[:, 1:] - s_hard[:, None])), 0.0)
  per_row = jnp.where(has_neg, margin + jnp.sum(above, axis=1), 0.0)
  return jnp.mean(per_row), {"m3se_margin": jnp.mean(jnp.where(has_neg, margin, 0.0))}


def m3se_loss(student: jax.Array, teacher: jax.Array,
              scored: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Table 5 "M3SE" (Menon et al. 2022, as paper 002 §4.3 states it): (1) the margin between the
  positive and the hardest negative is the teacher's, (2) no other negative scores above the
  hardest one. Per row, with h = the negative the teacher scores highest:
    ((s_pos - s_h) - (t_pos - t_h))^2 + sum_{k != h} max(0, s_k - s_h)^2.
  student [R, 1+K] similarities s, teacher [R, 1+K] scores (column 0 the positive), scored bool
  [R, 1+K] (only scored negatives take part). Rows without a scored negative give 0.
  Returns (mean over rows, {"m3se_margin"})."""
  chex.assert_equal_shape([student, teacher, scored])
  return _m3se(student.astype(jnp.float32), jax.lax.stop_gradient(teacher).astype(jnp.float32),
               scored)


def min_max_rescale(x: jax.Array, keep: jax.Array) -> jax.Array:
  """(x - min) / (max - min) per row over the kept entries (0 where max == min). [R, N] -> [R, N]."""
  lo = jnp.min(jnp.where(keep, x, jnp.inf), axis=1, keepdims=True)
  hi = jnp.max(jnp.where(keep, x, -jnp.inf), axis=1, keepdims=True)
  span = hi - lo
  ok = keep & (span > 0)
  return jnp.where(ok, (x - jnp.where(ok, lo, 0.0)) / jnp.where(ok, span, 1.0), 0.0)


def rm3se_loss(student: jax.Array, teacher: jax.Array,
               scored: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Table 5 "R-M3SE" (paper 002 §4.3): M3SE after min-max rescaling both the student's and the
  teacher's scores to [0, 1] per row over the positive and the scored negatives, so that their
  different ranges do not matter. Same shapes and result as `m3se_loss`."""
  chex.assert_equal_shape([student, teacher, scored])
  keep = scored.at[:, 0].set(True)
  s = min_max_rescale(student.astype(jnp.float32), keep)
  t = min_max_rescale(jax.lax.stop_gradient(teacher).astype(jnp.float32), keep)
  return _m3se(s, t, scored)


def bank_lookup(bank_keys: jax.Array, bank_scores: jax.Array, rows: jax.Array,
                keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Offline CPRD (§3.2.2): the teacher's score of each (row, candidate) pair from a similarity
  bank; a pair absent from the bank is unscored (hence an invalid hard negative).

  bank_keys int [Q, N] (per query item, the ids of its N pre-scored candidates, -1 padding),
  bank_scores [Q, N]; rows int [R] (each row's query index into the bank), keys int [R, K]
  (candidate ids of its hard negatives). Returns (scores [R, K], scored bool [R, K])."""
  chex.assert_equal_shape([bank_keys, bank_scores])
  row_keys, row_scores = bank_keys[rows], bank_scores[rows]                    # [R, N]
  hit = (row_keys[:, None, :] == keys[:, :, None]) & (keys[:, :, None] >= 0)  # [R, K, N]
  scored = jnp.any(hit, axis=2)
  scores = jnp.sum(jnp.where(hit, row_scores[:, None, :], 0.0), axis=2)
  return scores, scored
