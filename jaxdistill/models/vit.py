"""Vision Transformer image tower (Dosovitskiy et al., ViT; the image encoder F of paper 003 §3).

Images [B, H, W, C] are cut into non-overlapping patch_size x patch_size patches; each patch
becomes one token through a stem ("linear": the standard patch projection; "conv": a small
per-patch conv stem, better suited to whole 28x28 Fashion-MNIST cells), plus a learned
position ("cell") embedding; a learned [CLS] token is prepended. Output tokens [B, 1 + P, D],
[CLS] first, after the pre-LN encoder's final LayerNorm.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.layers import Encoder

STEMS = ("linear", "conv")


class ConvPatchStem(nn.Module):
  """Per-patch conv stem: two 3x3 stride-2 convs with GELU (widths D/4, D/2) inside each patch,
  then a Dense to D. patches [N, p, p, C] -> [N, D]. The convs never cross a patch border."""
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    x = patches
    for i, features in enumerate((max(1, self.hidden_size // 4), max(1, self.hidden_size // 2))):
      x = nn.Conv(features, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
                  name=f"conv_{i}")(x)
      x = nn.gelu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="to_hidden")(x)


class ViT(nn.Module):
  """images float32 [B, H, W, C] -> tokens [B, 1 + P, D] with P = (H/p)(W/p), [CLS] first."""
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  stem: str = "linear"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"   # config.model.remat: each encoder layer (layers.remat_block)

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    chex.assert_rank(images, 4)
    batch, height, width, channels = images.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not divisible by patch_size={p}: "
                       "choose a patch_size that divides the image height and width")
    rows, cols = height // p, width // p
    num_patches = rows * cols
    if self.stem == "linear":
      x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                  name="patch_embedding")(images)
      x = x.reshape(batch, num_patches, self.hidden_size)
    elif self.stem == "conv":
      patches = images.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
      patches = patches.reshape(batch * num_patches, p, p, channels)
      x = ConvPatchStem(self.hidden_size, self.dtype, name="conv_stem")(patches)
      x = x.reshape(batch, num_patches, self.hidden_size)
    else:
      raise ValueError(f"ViT stem={self.stem!r} is unknown: use one of {', '.join(STEMS)}")

    init = nn.initializers.normal(stddev=0.02)
    position = self.param("position_embedding", init, (1, num_patches, self.hidden_size))
    cls = self.param("cls_embedding", init, (1, 1, self.hidden_size))
    x = x + position.astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.hidden_size)), x],
                        axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, dropout_rate=self.dropout_rate,
                dtype=self.dtype, remat=self.remat, name="encoder")(x, deterministic=deterministic)
    chex.assert_shape(x, (batch, 1 + num_patches, self.hidden_size))
    return x
