"""BERT-style text tower (the text encoder G of paper 003 §3): learned token and position
embeddings, a pre-LN transformer encoder with a padding mask, final LayerNorm.

ids int32 [B, L] and mask [B, L] (1 = real token, [CLS] first) -> tokens [B, L, D].
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.layers import Encoder


class TextEncoder(nn.Module):
  """ids int32 [B, L], mask [B, L] -> tokens [B, L, D]; L <= max_len. Position [CLS] = 0."""
  vocab_size: int
  max_len: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"   # config.model.remat: each encoder layer (layers.remat_block)

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
    chex.assert_rank(ids, 2)
    chex.assert_type(ids, int)
    chex.assert_equal_shape([ids, mask])
    batch, length = ids.shape
    if length > self.max_len:
      raise ValueError(f"text length {length} exceeds the text encoder's max_len={self.max_len}: "
                       f"truncate the ids to {self.max_len} tokens or raise model.max_len")
    init = nn.initializers.normal(stddev=0.02)
    x = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init, dtype=self.dtype,
                 name="token_embedding")(ids)
    position = self.param("position_embedding", init, (1, self.max_len, self.hidden_size))
    x = x + position[:, :length].astype(x.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, dropout_rate=self.dropout_rate,
                dtype=self.dtype, remat=self.remat, name="encoder")(
                    x, mask, deterministic=deterministic)
    chex.assert_shape(x, (batch, length, self.hidden_size))
    return x
