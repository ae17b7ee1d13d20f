"""The image encoder of Hugging Face's ViTModel, BeitModel and Data2VecVisionModel as a Flax
model (and the pre-LN transformer CLIP and BLIP share); checkpoint mapping: pretrained/vit.py.

One `ImageEncoder` covers the three: they are the same pre-LN transformer over patch tokens and
differ only in options that their configs name (transformers 4.57 modeling_vit.py,
modeling_beit.py; data2vec-vision is BEiT's code with another default for the pooler):

| option               | ViT              | BEiT / data2vec-vision                              |
|----------------------|------------------|-----------------------------------------------------|
| positions            | absolute         | relative bias per layer or shared (+ absolute opt.) |
| key bias             | qkv_bias         | none (query, value have one)                        |
| layer scale (lambda) | no               | layer_scale_init_value > 0                          |
| after the last layer | LayerNorm        | LayerNorm, or nothing if use_mean_pooling           |
| pooled output        | tanh(Dense(CLS)) | LayerNorm(mean of patch tokens), or CLS             |

Images are NHWC float32 [B, H, W, C] (HF takes NCHW); H, W must equal image_size (the positions
are not interpolated). Attention: softmax(q k^T / sqrt(d) + bias) v, with a boolean mask (False =
never attended to).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models.bert import activation
from jaxdistill.models.layers import remat_block

RELATIVE_POSITIONS = ("none", "per_layer", "shared")
POOLS = ("cls", "mean")


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
  """BEiT's table index [N+1, N+1] for an (Wh, Ww) patch grid, N = Wh*Ww, [CLS] first
  (BeitRelativePositionBias.generate_relative_position_index): patch pairs index their 2-d
  offset; the last three rows of the table are CLS->patch, patch->CLS, CLS->CLS."""
  wh, ww = window
  num_distances = (2 * wh - 1) * (2 * ww - 1)
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  offsets = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  index = np.zeros((wh * ww + 1,) * 2, dtype=np.int32)
  index[1:, 1:] = (offsets[..., 0] + wh - 1) * (2 * ww - 1) + offsets[..., 1] + ww - 1
  index[0, :] = num_distances
  index[:, 0] = num_distances + 1
  index[0, 0] = num_distances + 2
  return index


class RelativePositionBias(nn.Module):
  """Learned per-head bias on attention logits by relative patch offset (BEiT §2.3):
  () -> [1, H, N+1, N+1]."""
  window: tuple[int, int]
  num_heads: int

  @nn.compact
  def __call__(self) -> jax.Array:
    wh, ww = self.window
    table = self.param("relative_position_bias_table", nn.initializers.zeros,
                       ((2 * wh - 1) * (2 * ww - 1) + 3, self.num_heads))
    bias = table[relative_position_index(self.window)]
    return bias.transpose(2, 0, 1)[None]


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate query/key/value/out Dense layers (the HF layout):
  x [B, L, D], mask bool broadcastable to [B, H, L, L] or None, bias float broadcastable to
  [B, H, L, L] or None -> [B, L, D]."""
  num_heads: int
  qkv_bias: tuple[bool, bool, bool] = (True, True, True)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"hidden size {width} is not divisible by num_attention_heads="
                            f"{self.num_heads}: fix the config")
    q, k, v = (nn.Dense(width, use_bias=use_bias, dtype=self.dtype, name=name)(x).reshape(
        batch, length, self.num_heads, width // self.num_heads)
               for name, use_bias in zip(("query", "key", "value"), self.qkv_bias))
    y = nn.dot_product_attention(q, k, v, bias=bias, mask=mask, dtype=self.dtype)
    return nn.Dense(width, dtype=self.dtype, name="out")(y.reshape(batch, length, width))


class PreNormBlock(nn.Module):
  """x += g1 * Attn(LN(x)); x += g2 * MLP(LN(x)): [B, L, D] -> [B, L, D].

  g1, g2 are BEiT's layer-scale vectors (lambda_1, lambda_2) when layer_scale_init > 0, else 1.
  relative_window: a per-layer RelativePositionBias over that patch grid (BEiT
  use_relative_position_bias); `bias` adds a shared one.
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: tuple[bool, bool, bool] = (True, True, True)
  layer_scale_init: float = 0.0
  relative_window: tuple[int, int] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    if self.relative_window is not None:
      own = RelativePositionBias(self.relative_window, self.num_heads,
                                 name="relative_position_bias")()
      bias = own if bias is None else bias + own

    def scaled(y, name):
      if self.layer_scale_init <= 0:
        return y
      return y * self.param(name, nn.initializers.constant(self.layer_scale_init), (width,))

    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln_attn")(x)
    y = SelfAttention(self.num_heads, self.qkv_bias, self.dtype, name="attention")(y, mask, bias)
    x = x + scaled(y, "lambda_1")
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln_mlp")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(y)
    y = nn.Dense(width, dtype=self.dtype, name="fc2")(activation(self.activation)(y))
    return x + scaled(y, "lambda_2")


class PreNormEncoder(nn.Module):
  """num_layers PreNormBlocks (no final LayerNorm): x [B, L, D], mask -> [B, L, D].

  relative_positions: "none", "per_layer" (each block owns a bias table) or "shared" (one
  table for all blocks, BEiT use_shared_relative_position_bias); both need `window`.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: tuple[bool, bool, bool] = (True, True, True)
  layer_scale_init: float = 0.0
  relative_positions: str = "none"
  window: tuple[int, int] | None = None
  dtype: Any = jnp.float32
  remat: str = "none"   # config.model.remat: each layer (models/layers.remat_block)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if self.relative_positions not in RELATIVE_POSITIONS:
      raise ValueError(f"relative_positions={self.relative_positions!r} is unknown: use "
                            f"one of {', '.join(RELATIVE_POSITIONS)}")
    shared = None
    if self.relative_positions == "shared":
      shared = RelativePositionBias(self.window, self.num_heads, name="relative_position_bias")()
    per_layer = self.window if self.relative_positions == "per_layer" else None
    block = remat_block(PreNormBlock, self.remat)
    for i in range(self.num_layers):
      x = block(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                self.qkv_bias, self.layer_scale_init, per_layer, self.dtype,
                name=f"layer_{i}")(x, mask, shared)
    return x


class ImageEncoder(nn.Module):
  """images [B, H, W, C] -> (tokens [B, 1 + P, D] with [CLS] first, pooled [B, D']).

  Patch conv (bias: patch_bias) -> prepend [CLS] -> + absolute positions (if
  absolute_positions) -> LayerNorm (if pre_norm: CLIP's pre_layrnorm) -> PreNormEncoder ->
  LayerNorm on all tokens (if final_norm). Pooled: the [CLS] token or the mean of the patch
  tokens (pool), then LayerNorm (if pool_norm), then Dense + pooler activation (if pooler is an
  activation name; D' = pooler_size or D).
  """
  image_size: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: tuple[bool, bool, bool] = (True, True, True)
  layer_scale_init: float = 0.0
  patch_bias: bool = True
  absolute_positions: bool = True
  relative_positions: str = "none"
  pre_norm: bool = False
  final_norm: bool = True
  pool: str = "cls"
  pool_norm: bool = False
  pooler: str | None = None
  pooler_size: int | None = None
  dtype: Any = jnp.float32
  remat: str = "none"   # config.model.remat: each layer (models/layers.remat_block)

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank(images, 4)
    batch, height, width, _ = images.shape
    if (height, width) != (self.image_size, self.image_size):
      raise ValueError(f"image size {height}x{width} differs from the model's image_size="
                            f"{self.image_size}: resize the images to {self.image_size}x"
                            f"{self.image_size} (NHWC)")
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r} is unknown: use one of {', '.join(POOLS)}")
    p, d = self.patch_size, self.hidden_size
    grid = (height // p, width // p)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
                dtype=self.dtype, name="patch_embedding")(images).reshape(batch, -1, d)
    init = nn.initializers.normal(stddev=0.02)
    cls = self.param("cls_token", init, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, d)), x], axis=1)
    if self.absolute_positions:
      x = x + self.param("position_embedding", init, (1, x.shape[1], d)).astype(x.dtype)
    norm = functools.partial(nn.LayerNorm, self.layer_norm_eps, dtype=self.dtype)
    if self.pre_norm:
      x = norm(name="pre_norm")(x)
    x = PreNormEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.activation,
                       self.layer_norm_eps, self.qkv_bias, self.layer_scale_init,
                       self.relative_positions, grid, self.dtype, self.remat,
                       name="encoder")(x)
    if self.final_norm:
      x = norm(name="final_norm")(x)
    pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(axis=1)
    if self.pool_norm:
      pooled = norm(name="pool_norm")(pooled)
    if self.pooler is not None:
      pooled = nn.Dense(self.pooler_size or d, dtype=self.dtype, name="pooler")(pooled)
      pooled = activation(self.pooler)(pooled)
    return x, pooled
