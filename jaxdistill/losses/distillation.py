"""Score-distribution distillation: a student's scores over a candidate list learn a teacher's.

Owns LoopITR's listwise distillation over a positive and m hard negatives, and the generic
KL(teacher || student) over the last axis used by the later recipes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def listwise_distillation(student_scores: jax.Array, teacher_scores: jax.Array,
                          temperature: jax.Array | float, stop_gradient: bool = True,
                          valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LoopITR eq. 5-7: cross-entropy from the teacher's to the student's distribution over N_i.

  student_scores: [N, m+1], dual-encoder similarities s_{x,y} (eq. 1, not divided by tau) of the
    positive pair (column 0) and the m hard negatives of each row.
  teacher_scores: [N, m+1], the cross encoder's positive-class logits h^pos on the same pairs.
  temperature: scalar tau, the ITC temperature of eq. 2 (applied to both, eq. 5 and 6).
  stop_gradient: eq. 7's stop-grad on q (no gradient reaches the teacher scores, nor tau through
    q); False is the Table 6 ablation.
  valid: optional bool [N, m+1]; False entries are left out of both softmaxes (e.g. a row with
    fewer than m usable negatives). Column 0 must stay valid in every row.

  p = softmax(s / tau) (eq. 5), q = softmax(h^pos / tau) (eq. 6), per row H(q, p) =
  -sum_k q_k log p_k (eq. 7 writes H(p, stop-grad(q)); the teacher is the target). Eq. 7 sums
  over the n rows; we return the mean over rows. Call it once with the text negatives
  (L^txt) and once with the image negatives (L^img) and add the two.
  Returns (loss, {"distill_kl": mean KL(q || p) = loss minus the teacher's mean entropy}).
  """
  chex.assert_rank([student_scores, teacher_scores], 2)
  chex.assert_equal_shape([student_scores, teacher_scores])
  chex.assert_rank(temperature, 0)
  dtype = jnp.promote_types(student_scores.dtype, jnp.float32)   # bf16 -> f32
  if valid is None:
    valid = jnp.ones(student_scores.shape, bool)
  chex.assert_equal_shape([student_scores, valid])
  chex.assert_type(valid, bool)

  def masked_log_softmax(scores):
    logits = jnp.where(valid, scores.astype(dtype) / temperature, -jnp.inf)
    # Zero (not -inf) on invalid entries, so that q * log p has no 0 * inf in value or gradient.
    return jnp.where(valid, jax.nn.log_softmax(logits, axis=-1), 0.0)

  log_p = masked_log_softmax(student_scores)
  log_q = masked_log_softmax(teacher_scores)
  if stop_gradient:
    log_q = jax.lax.stop_gradient(log_q)
  q = jnp.where(valid, jnp.exp(log_q), 0.0)
  cross_entropy = -jnp.sum(q * log_p, axis=-1)
  kl = jnp.sum(q * (log_q - log_p), axis=-1)
  return jnp.mean(cross_entropy), {"distill_kl": jnp.mean(kl)}


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """KL(q || p) over the last axis, q = softmax(teacher / tau) under stop-gradient, p = softmax(student / tau).

  Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), eq. 2, as used for the
  image-text matching distributions in Ren & Zhu (2022, stage 2) and the baselines of MCAD / CPRD.
  student_logits, teacher_logits: [..., C]; temperature: scalar tau.
  Returns the mean over all leading positions (rows) of sum_c q_c (log q_c - log p_c); no tau^2
  factor (multiply by tau**2 in the recipe to keep Hinton's gradient scale).
  Returns (loss, {"kd_cross_entropy": mean H(q, p)}).
  """
  chex.assert_equal_shape([student_logits, teacher_logits])
  chex.assert_rank(temperature, 0)
  dtype = jnp.promote_types(student_logits.dtype, jnp.float32)   # bf16 -> f32
  log_p = jax.nn.log_softmax(student_logits.astype(dtype) / temperature, axis=-1)
  log_q = jax.lax.stop_gradient(
      jax.nn.log_softmax(teacher_logits.astype(dtype) / temperature, axis=-1))
  q = jnp.exp(log_q)
  kl = jnp.mean(jnp.sum(q * (log_q - log_p), axis=-1))
  return kl, {"kd_cross_entropy": jnp.mean(-jnp.sum(q * log_p, axis=-1))}
