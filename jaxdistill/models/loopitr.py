"""The LoopITR network (paper 003 §3, Fig. 3): a dual encoder (ViT image tower, BERT-style text
tower, projections, temperature) with an ALBEF-style cross encoder on top of its token outputs,
plus the ITM and MLM heads. Built from the `model` section of the config.

The cross encoder reads the text encoder's output tokens as its input sequence and attends to
the image encoder's output tokens; both are first mapped to cross_width by a Dense when their
width differs (identity when equal).

Every method is a linen method: `model.apply({"params": params}, images,
method=LoopITRModel.encode_image)`, and likewise encode_text, match_logits, mlm_logits,
temperature. `__call__` runs all of them so that `init` creates every parameter.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.cross import CrossEncoder, ITMHead, MLMHead
from jaxdistill.models.dual import DualEncoder
from jaxdistill.models.text import TextEncoder
from jaxdistill.models.vit import ViT

CONFIG_FIELDS = (
    "image_size", "channels", "patch_size", "stem",
    "vision_width", "vision_layers", "vision_heads", "vision_mlp",
    "text_width", "text_layers", "text_heads", "text_mlp",
    "cross_width", "cross_layers", "cross_heads", "cross_mlp",
    "vocab_size", "max_len", "embed_dim", "image_pool", "temperature_init", "dropout_rate",
)
DTYPES = ("float32", "bfloat16")


class LoopITRModel(nn.Module):
  """Dual encoder + cross encoder + ITM / MLM heads; fields mirror the `model` config."""
  image_size: int
  channels: int
  patch_size: int
  stem: str
  vision_width: int
  vision_layers: int
  vision_heads: int
  vision_mlp: int
  text_width: int
  text_layers: int
  text_heads: int
  text_mlp: int
  cross_width: int
  cross_layers: int
  cross_heads: int
  cross_mlp: int
  vocab_size: int
  max_len: int
  embed_dim: int
  image_pool: str = "concat"
  temperature_init: float = 0.07
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32   # computation dtype; params stay float32

  def setup(self):
    image_encoder = ViT(self.patch_size, self.vision_width, self.vision_layers, self.vision_heads,
                        self.vision_mlp, stem=self.stem, dropout_rate=self.dropout_rate,
                        dtype=self.dtype)
    text_encoder = TextEncoder(self.vocab_size, self.max_len, self.text_width, self.text_layers,
                               self.text_heads, self.text_mlp, dropout_rate=self.dropout_rate,
                               dtype=self.dtype)
    self.dual = DualEncoder(image_encoder, text_encoder, self.embed_dim,
                            image_pool=self.image_pool, temperature_init=self.temperature_init,
                            dtype=self.dtype)
    self.image_to_cross = (nn.Dense(self.cross_width, dtype=self.dtype)
                           if self.vision_width != self.cross_width else None)
    self.text_to_cross = (nn.Dense(self.cross_width, dtype=self.dtype)
                          if self.text_width != self.cross_width else None)
    self.cross = CrossEncoder(self.cross_width, self.cross_layers, self.cross_heads,
                              self.cross_mlp, dropout_rate=self.dropout_rate, dtype=self.dtype)
    self.itm_head = ITMHead(dtype=self.dtype)
    self.mlm_head = MLMHead(self.vocab_size, dtype=self.dtype)

  def encode_image(self, images: jax.Array, deterministic: bool = True
                   ) -> tuple[jax.Array, jax.Array]:
    """images float32 [B, H, W, C] -> (emb [B, E] unit-norm, tokens [B, 1 + P, vision_width])."""
    return self.dual.encode_image(images, deterministic)

  def encode_text(self, ids: jax.Array, mask: jax.Array, deterministic: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
    """ids int32 [B, L], mask [B, L] -> (emb [B, E] unit-norm, tokens [B, L, text_width])."""
    return self.dual.encode_text(ids, mask, deterministic)

  def temperature(self) -> jax.Array:
    """Scalar ITC temperature tau, clipped to [0.001, 0.5]."""
    return self.dual.temperature()

  def fuse(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
           deterministic: bool = True) -> jax.Array:
    """Cross encoder on encoder outputs: text [B, L, Dt], mask [B, L], image [B, M, Dv]
    -> fused [B, L, cross_width]."""
    chex.assert_rank([text_tokens, text_mask, image_tokens], [3, 2, 3])
    if self.text_to_cross is not None:
      text_tokens = self.text_to_cross(text_tokens)
    if self.image_to_cross is not None:
      image_tokens = self.image_to_cross(image_tokens)
    return self.cross(text_tokens, text_mask, image_tokens, deterministic)

  def match_logits(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
                   deterministic: bool = True) -> jax.Array:
    """ITM logits float32 [B, 2] ([:, 0] = match, eq. 4) for the pairs (image b, text b)."""
    return self.itm_head(self.fuse(text_tokens, text_mask, image_tokens, deterministic))

  def mlm_logits(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
                 deterministic: bool = True) -> jax.Array:
    """MLM logits float32 [B, L, vocab_size] at every text position."""
    return self.mlm_head(self.fuse(text_tokens, text_mask, image_tokens, deterministic))

  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Runs every submodule (so `init` creates all params) -> dict of all outputs."""
    image_emb, image_tokens = self.encode_image(images, deterministic)
    text_emb, text_tokens = self.encode_text(ids, mask, deterministic)
    fused = self.fuse(text_tokens, mask, image_tokens, deterministic)
    return dict(image_emb=image_emb, text_emb=text_emb, temperature=self.temperature(),
                match_logits=self.itm_head(fused), mlm_logits=self.mlm_head(fused))


def build_model(model_cfg) -> LoopITRModel:
  """LoopITRModel from a `model` ConfigDict (or any mapping) holding CONFIG_FIELDS and,
  optionally, dtype ("float32" | "bfloat16", computation only)."""
  missing = [f for f in CONFIG_FIELDS if f not in model_cfg]
  if missing:
    raise ValueError(f"model config lacks {', '.join(missing)}: set config.model.{missing[0]} "
                     "(see jaxdistill/config.py for the defaults)")
  dtype = model_cfg.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"--config.model.dtype={dtype!r} is not valid: use one of {', '.join(DTYPES)}")
  return LoopITRModel(**{f: model_cfg[f] for f in CONFIG_FIELDS}, dtype=jnp.dtype(dtype))


def init_params(model: LoopITRModel, key: jax.Array, image_shape: tuple[int, int, int],
                max_len: int) -> Any:
  """Params of every submodule, from one dummy image [1, *image_shape] and text [1, max_len]."""
  images = jnp.zeros((1, *image_shape), jnp.float32)
  ids = jnp.zeros((1, max_len), jnp.int32)
  mask = jnp.ones((1, max_len), jnp.int32)
  return model.init(key, images, ids, mask)["params"]
