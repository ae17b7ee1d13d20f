"""Image-text contrastive (ITC) loss: similarity logits and the symmetric InfoNCE on them.

Owns the row-wise form of the loss (each row against its positive column), which is what every
device computes for its local rows against the gathered global columns (`parallel/gather.py`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def similarity_logits(img_emb: jax.Array, txt_emb: jax.Array,
                      temperature: jax.Array | float) -> tuple[jax.Array, jax.Array]:
  """Single-device similarity logits s_{x,y} / tau (LoopITR eq. 1-2).

  img_emb, txt_emb: [B, D] (normalised or not: this is the plain dot product of eq. 1).
  temperature: scalar tau > 0.
  Returns (i2t [B, B], t2i [B, B]): i2t[i, j] = <img_i, txt_j> / tau, t2i[i, j] = <txt_i, img_j> / tau
  (so t2i = i2t.T: rows are queries, columns candidates).
  """
  chex.assert_rank([img_emb, txt_emb], 2)
  chex.assert_equal_shape([img_emb, txt_emb])
  chex.assert_rank(temperature, 0)
  i2t = img_emb @ txt_emb.T / temperature
  return i2t, i2t.T


def row_cross_entropy(logits: jax.Array, positive_columns: jax.Array) -> jax.Array:
  """-log softmax(logits)[r, positive_columns[r]] for each row r. [R, C], [R] -> [R]."""
  dtype = jnp.promote_types(logits.dtype, jnp.float32)   # bf16 -> f32; f32 / f64 unchanged
  log_p = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  return -jnp.take_along_axis(log_p, positive_columns[:, None], axis=-1)[:, 0]


def contrastive_loss(logits_i2t: jax.Array, logits_t2i: jax.Array,
                     positive_columns: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ITC loss, LoopITR eq. 2-3 (the symmetric InfoNCE of CLIP / ALBEF).

  logits_i2t: [B_rows, B_cols], image queries (rows) against text candidates (columns), already
    divided by the temperature.
  logits_t2i: [B_rows, B_cols], text queries against image candidates, already divided by tau.
  positive_columns: int32 [B_rows], the column of each row's positive pair (arange(B) when the
    rows are the whole batch; the global index of the local rows when they are a device's slice).

  Eq. 3 sums -(log p^i2t_i + log p^t2i_i) over the n pairs; we return the mean over rows of
  (CE_i2t + CE_t2i) / 2, as ALBEF's and open_clip's code do (eq. 3 / 2n).
  Returns (loss, {"itc_i2t": mean CE_i2t, "itc_t2i": mean CE_t2i}).
  """
  chex.assert_rank([logits_i2t, logits_t2i, positive_columns], [2, 2, 1])
  chex.assert_equal_shape([logits_i2t, logits_t2i])
  chex.assert_equal_shape_prefix([logits_i2t, positive_columns], 1)
  chex.assert_type(positive_columns, int)
  i2t = jnp.mean(row_cross_entropy(logits_i2t, positive_columns))
  t2i = jnp.mean(row_cross_entropy(logits_t2i, positive_columns))
  return (i2t + t2i) / 2, {"itc_i2t": i2t, "itc_t2i": t2i}
