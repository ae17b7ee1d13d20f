"""ALBEF-style fusion (cross) encoder and its heads (the cross encoder H of paper 003 §3, Fig. 3).

Each layer: self-attention over the text tokens (padding-masked), cross-attention from the text
to the image tokens (keys and values), MLP. Heads: image-text matching (ITM, 2 classes on the
fused [CLS], index 0 = match, as in eq. 4) and BERT's masked-language-modelling head.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.layers import Encoder


class CrossEncoder(nn.Module):
  """text_tokens [B, L, D], text_mask [B, L], image_tokens [B, M, D] -> fused [B, L, D]."""
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"   # config.model.remat: each encoder layer (layers.remat_block)

  @nn.compact
  def __call__(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
               deterministic: bool = True) -> jax.Array:
    chex.assert_rank([text_tokens, text_mask, image_tokens], [3, 2, 3])
    chex.assert_equal_shape_prefix([text_tokens, text_mask, image_tokens], 1)
    if text_tokens.shape[-1] != self.hidden_size or image_tokens.shape[-1] != self.hidden_size:
      raise ValueError(f"CrossEncoder(hidden_size={self.hidden_size}) got text width "
                       f"{text_tokens.shape[-1]} and image width {image_tokens.shape[-1]}: project "
                       "both token sequences to the cross width first")
    return Encoder(self.num_layers, self.num_heads, self.mlp_dim, cross_attention=True,
                   dropout_rate=self.dropout_rate, dtype=self.dtype, remat=self.remat,
                   name="encoder")(
                       text_tokens, text_mask, image_tokens, deterministic=deterministic)


class ITMHead(nn.Module):
  """pooled fused feature [B, D] (the [CLS] position, or the mean over caption tokens) ->
  float32 logits [B, 2]; [:, 0] = match (eq. 4)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    chex.assert_rank(pooled, 2)
    return nn.Dense(2, dtype=self.dtype, name="classifier")(pooled).astype(jnp.float32)


class MLMHead(nn.Module):
  """BERT's MLM head: Dense(D) -> GELU -> LayerNorm -> Dense(V). fused [B, L, D] -> float32
  logits [B, L, V]. The decoder is its own weight (not tied to the token embedding)."""
  vocab_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, fused: jax.Array) -> jax.Array:
    chex.assert_rank(fused, 3)
    x = nn.Dense(fused.shape[-1], dtype=self.dtype, name="transform")(fused)
    x = nn.LayerNorm(dtype=self.dtype, name="ln")(nn.gelu(x))
    return nn.Dense(self.vocab_size, dtype=self.dtype, name="decoder")(x).astype(jnp.float32)
