"""Pre-LayerNorm transformer building blocks shared by every tower: one layer (self-attention,
optional cross-attention, MLP) and a stack of them with a final LayerNorm.

Pre-LN (LayerNorm before each sub-layer, residual around it, one LayerNorm after the stack)
as in ViT (Dosovitskiy et al.); the cross-attention sub-layer follows ALBEF's fusion layer
(paper 003 §3: text queries, image tokens as keys and values).

Masks are padding masks over key positions: a position whose mask is 0/False is never
attended to, so padded tokens cannot change the outputs at real positions.

Rematerialisation (`remat_block`, config.model.remat): every transformer block of a tower (this
file's TransformerLayer, models/bert.BertLayer, models/hf_vit.PreNormBlock) can be wrapped in
`nn.remat`, so the backward pass recomputes the block's activations instead of keeping them:
"none" keeps everything (the default), "full" keeps only each block's input, "dots" keeps the
outputs of the matmuls with weights (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
and recomputes attention scores, softmax, LayerNorms and activations. The wrapped block keeps its
name, so the params tree is the same with any setting (checkpoints load across settings).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.config import REMAT_POLICIES

_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_block(block: type[nn.Module], remat: str = "none",
                static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`block` itself (remat "none") or `nn.remat(block)` with the policy of `remat` ("full" |
  "dots"): the one place that turns config.model.remat into a module class. static_argnums:
  positions of `__call__`'s Python (non-array) arguments, `self` being 0."""
  if remat == "none":
    return block
  if remat not in _POLICIES:
    raise ValueError(f"--config.model.remat={remat!r} is not valid: use one of "
                     f"{', '.join(REMAT_POLICIES)}")
  return nn.remat(block, policy=_POLICIES[remat], static_argnums=static_argnums)


def key_padding_mask(key_mask: jax.Array, query_length: int) -> jax.Array:
  """[B, M] int/bool key mask -> bool attention mask [B, 1, Lq, M] (heads broadcast)."""
  query_mask = jnp.ones((key_mask.shape[0], query_length), dtype=bool)
  return nn.make_attention_mask(query_mask, key_mask.astype(bool), dtype=bool)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense(D): [B, L, D] -> [B, L, D]."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    width = x.shape[-1]
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    y = nn.gelu(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = nn.Dense(width, dtype=self.dtype, name="fc2")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class TransformerLayer(nn.Module):
  """One pre-LN layer: x += SelfAttn(LN(x)); [x += CrossAttn(LN(x), context)]; x += MLP(LN(x)).

  x [B, L, D]; mask [B, L] (1 = real token) or None; context [B, M, Dc] (required when
  cross_attention, any width Dc: the key/value projections map it to D); context_mask [B, M]
  or None. Returns [B, L, D].
  """
  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def _attention(self, name: str) -> nn.MultiHeadDotProductAttention:
    return nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.dropout_rate,
        kernel_init=nn.initializers.xavier_uniform(), name=name)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None, context_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    chex.assert_rank(x, 3)
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"hidden width {width} is not divisible by num_heads={self.num_heads}: "
                       "choose a width that is a multiple of the number of heads")
    if mask is not None:
      chex.assert_shape(mask, (batch, length))
    self_mask = None if mask is None else key_padding_mask(mask, length)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_self")(x)
    y = self._attention("self_attention")(y, y, mask=self_mask, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

    if self.cross_attention:
      if context is None:
        raise ValueError("TransformerLayer(cross_attention=True) needs `context` [B, M, D]: "
                         "pass the tokens to attend to (e.g. the image encoder's output)")
      chex.assert_rank(context, 3)
      chex.assert_equal(context.shape[0], batch)
      cross_mask = None
      if context_mask is not None:
        chex.assert_shape(context_mask, context.shape[:2])
        cross_mask = key_padding_mask(context_mask, length)
      y = nn.LayerNorm(dtype=self.dtype, name="ln_cross")(x)
      y = self._attention("cross_attention")(y, context, mask=cross_mask,
                                             deterministic=deterministic)
      x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    return x + MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(y, deterministic)


class Encoder(nn.Module):
  """num_layers TransformerLayers then a final LayerNorm: [B, L, D] -> [B, L, D].

  Arguments of __call__ are those of TransformerLayer; context is used only when
  cross_attention. remat: config.model.remat, applied to each layer (`remat_block`).
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"   # rematerialisation of each layer (`remat_block`)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None, context_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    layer = remat_block(TransformerLayer, self.remat, static_argnums=(5,))   # 5: deterministic
    for i in range(self.num_layers):
      x = layer(self.num_heads, self.mlp_dim, self.cross_attention, self.dropout_rate,
                self.dtype, name=f"layer_{i}")(x, mask, context, context_mask, deterministic)
    return nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
