"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised
Vision Transformers", ICCV 2021, §3.1 and Algorithm 1).

A student g_s and a teacher g_t (the student's exponential moving average, methods/dino.py) see
views of one image; each outputs K prototype logits. With P_t = softmax((g_t(x) - C) / tau_t)
(centring by C, sharpening by the low temperature tau_t) and P_s = softmax(g_s(x') / tau_s),
the loss is the cross-entropy H(P_t, P_s) = -sum_k P_t[k] log P_s[k] (the paper's eq. 2-3),
summed over the pairs of views (x, x') with x != x' and averaged over the batch. The teacher's
side carries stop_gradient ("sg" in Algorithm 1: gradients propagate only through the student).

Algorithm 1 (two global views x1, x2):
    loss = H(t1, s2) / 2 + H(t2, s1) / 2
    C = m * C + (1 - m) * cat([t1, t2]).mean(dim=0)
This project uses the two global views only: no multi-crop (a local crop of a 2x2 grid would
cut items out of their cells or show a cell without its position, which the benchmark's
captions are about; docs/ssl_vit.md). With V views the loss here is the mean over the
V (V - 1) ordered pairs (v teacher, v' student), v != v' (the official implementation's
`total_loss / n_loss_terms`); V = 2 gives Algorithm 1 exactly.

Shapes: logits [V, B, K] (view, example, prototype), centre [K]. Every function is pure and
jitted; temperatures and the centre momentum are ordinary (traced) scalars.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _float(x: jax.Array) -> jax.Array:
  """bf16 / f16 -> float32; float32 and float64 unchanged (x64 gradient checks)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@jax.jit
def teacher_distribution(teacher_logits: jax.Array, center: jax.Array,
                         teacher_temperature: jax.Array | float) -> jax.Array:
  """P_t = softmax((t - C) / tau_t) over the prototypes, under stop_gradient (Algorithm 1:
  `t = softmax((t - C) / tpt, dim=1)` of `t.detach()`). [..., K], [K] -> [..., K] (at least
  float32)."""
  t = jax.lax.stop_gradient(_float(teacher_logits))
  c = jax.lax.stop_gradient(_float(center))
  return jax.nn.softmax((t - c) / teacher_temperature, axis=-1)


@jax.jit
def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
              student_temperature: jax.Array | float,
              teacher_temperature: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DINO's loss (Caron et al. 2021, eq. 3 / Algorithm 1) over V views of B images.

  student_logits, teacher_logits: [V, B, K] (row v: view v of each image); center: [K].
  loss = mean over pairs v != v' of mean_b H(P_t[v, b], P_s[v', b]), where
  P_t = softmax((t - C) / tau_t) (no gradient) and log P_s = log_softmax(s / tau_s).
  Returns (loss [], parts): "teacher_entropy" (mean entropy of P_t: log K when the teacher
  collapses to uniform, 0 when it collapses to one prototype) and "kl" (loss minus the teacher
  entropy, the mean KL(P_t || P_s)) -- the two quantities the paper's §5.3 monitors for collapse.
  """
  chex.assert_rank([student_logits, teacher_logits], 3)
  chex.assert_equal_shape([student_logits, teacher_logits])
  views = student_logits.shape[0]
  if views < 2:
    raise ValueError(f"dino_loss needs at least 2 views per image, got {views}")
  p_t = teacher_distribution(teacher_logits, center, teacher_temperature)       # [V, B, K]
  log_p_s = jax.nn.log_softmax(_float(student_logits) / student_temperature, axis=-1)
  cross = -jnp.einsum("vbk,wbk->vwb", p_t, log_p_s).mean(axis=-1)   # [V teacher, V student]
  off_diagonal = 1.0 - jnp.eye(views, dtype=cross.dtype)
  loss = (cross * off_diagonal).sum() / (views * (views - 1))
  entropy = -(p_t * jnp.log(jnp.clip(p_t, 1e-30))).sum(axis=-1).mean()
  return loss, {"dino": loss, "teacher_entropy": entropy, "kl": loss - entropy}


@jax.jit
def update_center(center: jax.Array, teacher_logits: jax.Array,
                  momentum: jax.Array | float) -> jax.Array:
  """C <- m C + (1 - m) mean(teacher outputs) over every view and image of the batch
  (Algorithm 1: `C = m*C + (1-m)*cat([t1, t2]).mean(dim=0)`; the paper's eq. 4 with m = 0.9).
  center [K], teacher_logits [V, B, K] -> [K] (at least float32), no gradient."""
  chex.assert_rank(teacher_logits, 3)
  t = jax.lax.stop_gradient(_float(teacher_logits))
  batch_mean = t.reshape(-1, t.shape[-1]).mean(axis=0)
  return momentum * _float(center) + (1.0 - momentum) * batch_mean
