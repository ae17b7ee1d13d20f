"""MCAD's multi-teacher integration module (paper 001 §3.3, eq. 12-13, Fig. 2; MLPs per App. B).

For the pair (image l, text m) of a batch of n pairs, with the dual-stream teacher's image and
text features I^DS_l, T^DS_m and the single-stream teacher's [CLS] feature H^SS of that pair:

  g_1/2(H) = f_P(H) if (l, m) in P_i2t or (m, l) in P_t2i, else 0          (eq. 12, the gate)
  T^T = norm(g3(T^DS_m) + alpha * g1(H^SS_lm))                                       (eq. 13)
  I^T = norm(g4(I^DS_l) + alpha * g2(H^SS_lm))

with g1..g4 MLPs (App. B: "two-layer MLPs"; depth and width are fields), one learnable scalar
alpha and norm the L2 normalisation. Eq. 12-13 print H^SS_{m-l} and one ")" too many; we read
H^SS_{m-l} as the single-stream [CLS] of the pair (image l, text m). g1 and g2 are two different
projections of the same H (the paper: "projected to different spaces"); g1 feeds the text side,
g2 the image side, as eq. 13 writes.

The fused features depend on the pair, so the module returns them per top-k pair rather than per
example: the [n, n] matrices D^T, D^FAI, D^FAT are then assembled pair by pair by
`losses/mcad.pair_logits` / `integrated_logits` (the features with the gate closed everywhere
else). H^SS is only computed for the 2 n k top-k pairs, never for all n^2.

The teachers' features enter under stop_gradient: only alpha, g1..g4 and the temperature train.
The integrated teacher's temperature tau^T (eq. 3; the paper gives it no value) is a learnable
scalar like the dual encoder's (models/dual.py: exp(log tau), clipped to [0.001, 0.5]); freeze it
with a trainable rule to keep temperature_init.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.dual import TEMPERATURE_MAX, TEMPERATURE_MIN, l2_normalize


class IntegratedFeatures(NamedTuple):
  """The integrated teacher's features (float32), in the order `losses.mcad.integrated_logits`
  unpacks them.

  image: [n, e], I^T_l with the gate closed: norm(g4(I^DS_l)).
  text: [n, e], T^T_m with the gate closed: norm(g3(T^DS_m)).
  image_i2t, text_i2t: [n, k, e], I^T and T^T of pair (image l, text top_i2t[l, j]).
  image_t2i, text_t2i: [n, k, e], I^T and T^T of pair (image top_t2i[m, j], text m).
  temperature: [], tau^T.
  """
  image: jax.Array
  text: jax.Array
  image_i2t: jax.Array
  text_i2t: jax.Array
  image_t2i: jax.Array
  text_t2i: jax.Array
  temperature: jax.Array


class ProjectionMLP(nn.Module):
  """f_P / g_*: `depth` Dense layers, GELU between them, hidden width `hidden_dim`, output
  `features` ([..., D] -> [..., features]); depth = 1 is a single linear projection."""
  features: int
  hidden_dim: int
  depth: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.depth < 1:
      raise ValueError(f"ProjectionMLP depth={self.depth} must be >= 1 (the MCAD integration "
                       "module's mlp_depth; paper 001 App. B uses 2)")
    for i in range(self.depth - 1):
      x = nn.gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"layer_{i}")(x))
    return nn.Dense(self.features, dtype=self.dtype, name=f"layer_{self.depth - 1}")(x)


class IntegrationModule(nn.Module):
  """g1..g4, alpha and tau^T (eq. 12-13).

  embed_dim: e, the width of I^T / T^T (the student's embedding width: eq. 3's D^FAI and D^FAT
    take dot products of student and fused features).
  mlp_dim, mlp_depth: hidden width and number of Dense layers of each g (App. B: depth 2).
  alpha_init: initial alpha (the paper gives none; 1.0 so that g1 / g2 get a gradient from the
    first step, which alpha = 0 would withhold).
  temperature_init: initial tau^T.
  """
  embed_dim: int
  mlp_dim: int = 512
  mlp_depth: int = 2
  alpha_init: float = 1.0
  temperature_init: float = 0.07
  dtype: Any = jnp.float32

  def setup(self):
    if not TEMPERATURE_MIN <= self.temperature_init <= TEMPERATURE_MAX:
      raise ValueError(f"temperature_init={self.temperature_init} is outside the clip range "
                       f"[{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]: choose a value inside it (0.07)")
    mlp = lambda name: ProjectionMLP(self.embed_dim, self.mlp_dim, self.mlp_depth, self.dtype,
                                     name=name)
    self.g1, self.g2, self.g3, self.g4 = mlp("g1"), mlp("g2"), mlp("g3"), mlp("g4")
    self.alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), ())
    self.log_temperature = self.param(
        "log_temperature", nn.initializers.constant(math.log(self.temperature_init)), ())

  def temperature(self) -> jax.Array:
    """Scalar tau^T = clip(exp(log_temperature), 0.001, 0.5)."""
    return jnp.clip(jnp.exp(self.log_temperature), TEMPERATURE_MIN, TEMPERATURE_MAX)

  def __call__(self, dual_image: jax.Array, dual_text: jax.Array, ss_i2t: jax.Array,
               ss_t2i: jax.Array, top_i2t: jax.Array, top_t2i: jax.Array) -> IntegratedFeatures:
    """Eq. 13 on the top-k pairs and, gate closed, on every example.

    dual_image [n, Di] = I^DS, dual_text [n, Dt] = T^DS (the dual-stream teacher's features);
    ss_i2t [n, k, Dh]: H^SS of pair (image l, text top_i2t[l, j]); ss_t2i [n, k, Dh]: H^SS of
    pair (image top_t2i[m, j], text m); top_i2t, top_t2i int [n, k] (eq. 5,
    `losses.mcad.teacher_top_k`). All six under stop_gradient. Returns IntegratedFeatures."""
    chex.assert_rank([dual_image, dual_text, ss_i2t, ss_t2i, top_i2t, top_t2i],
                     [2, 2, 3, 3, 2, 2])
    chex.assert_equal_shape([top_i2t, top_t2i])
    chex.assert_equal_shape([ss_i2t, ss_t2i])
    chex.assert_equal_shape_prefix([dual_image, dual_text, top_i2t, ss_i2t], 1)
    chex.assert_equal_shape_prefix([top_i2t, ss_i2t], 2)
    dual_image, dual_text, ss_i2t, ss_t2i = jax.lax.stop_gradient(
        (dual_image, dual_text, ss_i2t, ss_t2i))
    top_i2t, top_t2i = jax.lax.stop_gradient((top_i2t, top_t2i))
    image = self.g4(dual_image).astype(jnp.float32)                       # [n, e]
    text = self.g3(dual_text).astype(jnp.float32)                         # [n, e]
    fuse = lambda base, gate: l2_normalize(base + self.alpha * gate.astype(jnp.float32))
    return IntegratedFeatures(
        image=l2_normalize(image), text=l2_normalize(text),
        image_i2t=fuse(jnp.broadcast_to(image[:, None], (*top_i2t.shape, image.shape[1])),
                       self.g2(ss_i2t)),
        text_i2t=fuse(text[top_i2t], self.g1(ss_i2t)),
        image_t2i=fuse(image[top_t2i], self.g2(ss_t2i)),
        text_t2i=fuse(jnp.broadcast_to(text[:, None], (*top_t2i.shape, text.shape[1])),
                      self.g1(ss_t2i)),
        temperature=self.temperature())

  def gates(self, ss_i2t: jax.Array, ss_t2i: jax.Array, top_i2t: jax.Array,
            top_t2i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eq. 12 as dense matrices: (g1, g2), float32 [n, n, e] each, entry [l, m] for the pair
    (image l, text m): g(H^SS_lm) when (l, m) in P_i2t or (m, l) in P_t2i, else exactly 0.
    O(n^2 e) memory: for inspection and tests; __call__ never builds it. Inputs as __call__."""
    n, _ = top_i2t.shape
    rows = jnp.arange(n)[:, None]
    ss_i2t, ss_t2i = jax.lax.stop_gradient((ss_i2t, ss_t2i))

    def dense(g):
      out = jnp.zeros((n, n, self.embed_dim), jnp.float32)
      out = out.at[top_t2i, rows].set(g(ss_t2i).astype(jnp.float32))
      return out.at[rows, top_i2t].set(g(ss_i2t).astype(jnp.float32))

    return dense(self.g1), dense(self.g2)
