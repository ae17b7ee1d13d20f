"""Dual encoder (paper 003 §3, eq. 1-3; CLIP / ALBEF ITC): an image tower and a text tower, each
pooled and projected to a shared embed_dim and L2-normalised, plus the learnable temperature.

Image pooling: "cls" (the [CLS] token) or "concat" (the P patch tokens, [CLS] excluded,
concatenated into [B, P*D] before the projection: one slot per patch, so per-cell content and
position survive pooling on the compositional benchmark). Text pooling: "cls" (the token at
position 0) or "mean" (the mean over real tokens, mask == 1: sentence-transformers, e.g. MiniLM).

Shared encoder (paper 004 §3.2): with `shared` (an Encoder of one or more randomly initialised
pre-LN transformer layers, ViT's architecture, plus its final LayerNorm), each tower's tokens go
through the same `shared` layers separately (text with its padding mask) before pooling:
H_K = f_s(H_L) for images and texts. With project=False there are no projections: the pooled
token itself, L2-normalised, is the embedding (paper 004 §3.3 compares the normalised [CLS]
outputs of the shared layer directly), so both towers must have the width embed_dim.

Temperature: tau = exp(log_temperature), log_temperature initialised to log(temperature_init)
(0.07, paper 003 eq. 2 / ALBEF), clipped to [0.001, 0.5] as ALBEF clamps it.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.bert import mean_pool

IMAGE_POOLS = ("cls", "concat")
TEXT_POOLS = ("cls", "mean")
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.001, 0.5


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """[..., E] -> [..., E] with unit L2 norm (x / max(||x||, sqrt(eps)))."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class DualEncoder(nn.Module):
  """Towers + projections + temperature.

  image_encoder: images [B, H, W, C] -> tokens [B, 1 + P, Dv] ([CLS] first), e.g. ViT.
  text_encoder: (ids [B, L], mask [B, L]) -> tokens [B, L, Dt] ([CLS] first), e.g. TextEncoder.
  Both take a `deterministic` keyword.
  """
  image_encoder: nn.Module
  text_encoder: nn.Module
  embed_dim: int
  image_pool: str = "concat"
  text_pool: str = "cls"
  temperature_init: float = 0.07
  shared: nn.Module | None = None
  project: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    if self.image_pool not in IMAGE_POOLS:
      raise ValueError(f"image_pool={self.image_pool!r} is unknown: use one of "
                       f"{', '.join(IMAGE_POOLS)}")
    if self.text_pool not in TEXT_POOLS:
      raise ValueError(f"text_pool={self.text_pool!r} is unknown: use one of "
                       f"{', '.join(TEXT_POOLS)}")
    if not TEMPERATURE_MIN <= self.temperature_init <= TEMPERATURE_MAX:
      raise ValueError(f"temperature_init={self.temperature_init} is outside the clip range "
                       f"[{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]: choose a value inside it (0.07)")
    if self.project:
      self.image_projection = nn.Dense(self.embed_dim, dtype=self.dtype)
      self.text_projection = nn.Dense(self.embed_dim, dtype=self.dtype)
    self.log_temperature = self.param(
        "log_temperature", nn.initializers.constant(math.log(self.temperature_init)), ())

  def encode_image(self, images: jax.Array, deterministic: bool = True
                   ) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, C] -> (emb float32 [B, E] unit-norm, tokens [B, 1 + P, Dv])."""
    tokens = self.image_encoder(images, deterministic=deterministic)
    chex.assert_rank(tokens, 3)
    if self.shared is not None:
      tokens = self.shared(tokens, deterministic=deterministic)
    if self.image_pool == "cls":
      pooled = tokens[:, 0]
    else:
      pooled = tokens[:, 1:].reshape(tokens.shape[0], -1)
    emb = l2_normalize(self._project(self.image_projection if self.project else None, pooled))
    chex.assert_shape(emb, (images.shape[0], self.embed_dim))
    return emb, tokens

  def encode_text(self, ids: jax.Array, mask: jax.Array, deterministic: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
    """ids [B, L], mask [B, L] -> (emb float32 [B, E] unit-norm, tokens [B, L, Dt])."""
    tokens = self.text_encoder(ids, mask, deterministic=deterministic)
    chex.assert_rank(tokens, 3)
    if self.shared is not None:
      tokens = self.shared(tokens, mask, deterministic=deterministic)
    pooled = tokens[:, 0] if self.text_pool == "cls" else mean_pool(tokens, mask)
    emb = l2_normalize(self._project(self.text_projection if self.project else None, pooled))
    chex.assert_shape(emb, (ids.shape[0], self.embed_dim))
    return emb, tokens

  def _project(self, projection: nn.Module | None, pooled: jax.Array) -> jax.Array:
    """pooled [B, F] -> float32 [B, E] (E = F when project=False)."""
    if projection is None:
      if pooled.shape[-1] != self.embed_dim:
        raise ValueError(f"project=False needs pooled features of width embed_dim="
                         f"{self.embed_dim}, got {pooled.shape[-1]}: set model.embed_dim to the "
                         "towers' width (and image_pool=cls)")
      return pooled.astype(jnp.float32)
    return projection(pooled).astype(jnp.float32)

  def temperature(self) -> jax.Array:
    """Scalar tau = clip(exp(log_temperature), 0.001, 0.5)."""
    return jnp.clip(jnp.exp(self.log_temperature), TEMPERATURE_MIN, TEMPERATURE_MAX)

  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (image emb [B, E], text emb [B, E], temperature []); creates every parameter."""
    image_emb, _ = self.encode_image(images, deterministic)
    text_emb, _ = self.encode_text(ids, mask, deterministic)
    return image_emb, text_emb, self.temperature()
