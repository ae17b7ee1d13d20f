"""Cross-encoder losses: image-text matching (ITM) and masked language modelling (MLM).

Owns the two classification losses of the cross encoder's heads; choosing the ITM negatives and
masking the tokens happen elsewhere (`methods/`, `data/masking.py`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def itm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ITM loss, LoopITR eq. 4: two-class cross-entropy of the cross encoder's scores.

  logits: [N, 2] = [h^pos, h^neg] for N image-text pairs.
  labels: int32 [N], 0 = matched pair (x_i, y_i), 1 = non-matched pair (x_i, y^_i) or (x^_i, y_i).

  The PDF's eq. 4 reads -log p[0] + log p[1] + log p[1]; the signs of the last two terms are a
  conversion error: we read it as the standard cross-entropy -log p[0] for the positive and
  -log p[1] for each negative (ALBEF's ITM, with LoopITR's class order: index 0 = positive).
  Eq. 4 sums over the n positives and their 2n negatives; we return the mean over the N pairs
  (ALBEF's code: cross_entropy over the concatenated 3n pairs).
  Returns (loss, {"itm_acc": fraction of pairs whose argmax class is the label}).
  """
  chex.assert_rank([logits, labels], [2, 1])
  chex.assert_axis_dimension(logits, 1, 2)
  chex.assert_equal_shape_prefix([logits, labels], 1)
  chex.assert_type(labels, int)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)   # bf16 -> f32; f32 / f64 unchanged
  log_p = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(log_p.dtype))
  return loss, {"itm_acc": acc}


def mlm_loss(logits: jax.Array, labels: jax.Array,
             weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MLM loss (BERT; used by LoopITR eq. 8): cross-entropy over the masked positions only.

  logits: [B, L, V]; labels: int32 [B, L], the original token ids (any value, e.g. -100, where
  weights == 0); weights: [B, L], 1 on masked positions and 0 elsewhere (bool or float).
  Normalised by the number of masked tokens sum(weights); a batch with no masked token gives
  loss 0 (and accuracy 0), never NaN.
  Returns (loss, {"mlm_acc": fraction of masked tokens predicted exactly}).
  """
  chex.assert_rank([logits, labels, weights], [3, 2, 2])
  chex.assert_equal_shape([labels, weights])
  chex.assert_equal_shape_prefix([logits, labels], 2)
  chex.assert_type(labels, int)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)   # bf16 -> f32; f32 / f64 unchanged
  weights = weights.astype(dtype)
  safe_labels = jnp.where(weights > 0, labels, 0)   # ignore-index labels must not reach the gather
  log_p = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  nll = -jnp.take_along_axis(log_p, safe_labels[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(dtype)
  num_masked = jnp.sum(weights)
  denominator = jnp.where(num_masked > 0, num_masked, 1.0)   # the sums below are 0 then
  loss = jnp.sum(weights * nll) / denominator
  return loss, {"mlm_acc": jnp.sum(weights * correct) / denominator}
