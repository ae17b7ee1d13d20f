"""The LoopITR network (paper 003 §3, Fig. 3): a dual encoder (image and text towers of
models/towers.py, projections, temperature) with an ALBEF-style cross encoder on top of its
token outputs, plus the ITM and MLM heads. Built from the `model` section of the config.

Cross encoders (`model.cross_encoder`):
- "prenorm" (models/cross.py, trained from scratch): reads the text encoder's output tokens and
  attends to the image encoder's; both are first mapped to cross_width by a Dense when their
  width differs (identity when equal).
- "bert" (models/bert.BertFusion): post-LN BERT layers with a cross-attention sub-layer, the
  layout of ALBEF's fusion encoder, so the last layers of a BERT-family checkpoint initialise
  it (paper 003 §4: the text encoder is BERT's first half, the cross encoder its second half
  with new cross-attention; config.init_from). Its cross-attention reads the image tokens at
  their own width (keys / values project them); the text tokens are mapped to cross_width
  only when their width differs. `model.cross_gate` puts a tanh gate starting at 0 on each
  cross-attention output (Flamingo).
- "single_stream" (models/bert.BertSingleStream): the same BERT layers as self-attention over
  caption tokens + projected image tokens (ViLT / UNITER; paper 001's "single-stream"), from
  the same checkpoint layers.
`model.cross_image_positions` > 0 adds a learnt embedding per image-token position (initialised
N(0, value)) to the image tokens the cross encoder reads, as UNITER adds a location feature to
each image region: cross-attention is blind to the order of its keys, so without it the cross
encoder knows where an item is only as far as the image tower wrote it into the token (on the
benchmark the trained ViT's cell tokens barely say it, its `concat` pooling does: docs/results.md).

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
import ml_collections

from jaxdistill.config import MODEL_DTYPES
from jaxdistill.models.bert import BertFusion, BertSingleStream, mean_pool
from jaxdistill.models.cross import CrossEncoder, ITMHead, MLMHead
from jaxdistill.models.dual import DualEncoder
from jaxdistill.models.towers import image_tower, image_width, remat, text_tower

CONFIG_FIELDS = (
    "image_size", "channels", "patch_size", "stem",
    "vision_width", "vision_layers", "vision_heads", "vision_mlp",
    "text_width", "text_layers", "text_heads", "text_mlp",
    "cross_width", "cross_layers", "cross_heads", "cross_mlp",
    "vocab_size", "max_len", "embed_dim", "image_pool", "temperature_init", "dropout_rate",
)
CROSS_ENCODERS = ("prenorm", "bert", "single_stream")
ITM_POOLS = ("cls", "mean")


class TokenPositions(nn.Module):
  """tokens [B, M, D] -> tokens + a learnt embedding per position [M, D], N(0, init_std)."""
  init_std: float

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.param("embedding", nn.initializers.normal(self.init_std), tokens.shape[1:])
    return tokens + table.astype(tokens.dtype)


class LoopITRModel(nn.Module):
  """Dual encoder + cross encoder + ITM / MLM heads, from the `model` config section `mc`
  (frozen, so the module stays hashable). The selector fields fall back to the values of
  configs saved before they existed (vit, transformer, cls pooling, prenorm cross encoder)."""
  mc: ml_collections.FrozenConfigDict
  dtype: Any = jnp.float32   # computation dtype; params stay float32

  def setup(self):
    mc = self.mc
    self.dual = DualEncoder(image_tower(mc, self.dtype), text_tower(mc, self.dtype),
                            mc.embed_dim, image_pool=mc.image_pool,
                            text_pool=mc.get("text_pool", "cls"),
                            temperature_init=mc.temperature_init, dtype=self.dtype)
    kind = mc.get("cross_encoder", "prenorm")
    dense = lambda width: nn.Dense(mc.cross_width, dtype=self.dtype) \
        if width != mc.cross_width else None
    self.text_to_cross = dense(mc.text_width)
    if kind == "prenorm":
      self.image_to_cross = dense(image_width(mc))
      self.cross = CrossEncoder(mc.cross_width, mc.cross_layers, mc.cross_heads, mc.cross_mlp,
                                dropout_rate=mc.dropout_rate, dtype=self.dtype, remat=remat(mc))
    elif kind == "bert":
      self.image_to_cross = None
      self.cross = BertFusion(mc.cross_layers, mc.cross_heads, mc.cross_mlp,
                              layer_norm_eps=mc.bert_layer_norm_eps,
                              hidden_act=mc.bert_hidden_act, dtype=self.dtype,
                              cross_init_std=mc.get("cross_init_std", 0.0),
                              cross_gate=mc.get("cross_gate", False), remat=remat(mc))
    elif kind == "single_stream":
      self.image_to_cross = None
      self.cross = BertSingleStream(mc.cross_layers, mc.cross_heads, mc.cross_mlp,
                                    layer_norm_eps=mc.bert_layer_norm_eps,
                                    hidden_act=mc.bert_hidden_act, dtype=self.dtype,
                                    remat=remat(mc))
    else:
      raise ValueError(f"--config.model.cross_encoder={kind!r} is not valid: use one of "
                       f"{', '.join(CROSS_ENCODERS)}")
    if mc.get("itm_pool", "cls") not in ITM_POOLS:
      raise ValueError(f"--config.model.itm_pool={mc.itm_pool!r} is not valid: use one of "
                       f"{', '.join(ITM_POOLS)}")
    positions = mc.get("cross_image_positions", 0.0)
    self.image_positions = TokenPositions(positions) if positions > 0 else None
    self.itm_head = ITMHead(dtype=self.dtype)
    self.mlm_head = MLMHead(mc.vocab_size, dtype=self.dtype)

  def encode_image(self, images: jax.Array, deterministic: bool = True
                   ) -> tuple[jax.Array, jax.Array]:
    """images float32 [B, H, W, C] -> (emb [B, E] unit-norm, tokens [B, 1 + P, Dv])."""
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
    if self.image_positions is not None:
      image_tokens = self.image_positions(image_tokens)
    if self.image_to_cross is not None:
      image_tokens = self.image_to_cross(image_tokens)
    return self.cross(text_tokens, text_mask, image_tokens, deterministic)

  def pool_fused(self, fused: jax.Array, text_mask: jax.Array) -> jax.Array:
    """What the ITM head reads: fused [B, L, D] -> [B, D], the [CLS] position (model.itm_pool
    = cls, BERT / ALBEF) or the mean over the caption's tokens (mean: what sentence-transformers'
    MiniLM was trained to pool; its [CLS] output is nearly constant, docs/results.md)."""
    if self.mc.get("itm_pool", "cls") == "mean":
      return mean_pool(fused, text_mask)
    return fused[:, 0]

  def match_logits(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
                   deterministic: bool = True) -> jax.Array:
    """ITM logits float32 [B, 2] ([:, 0] = match, eq. 4) for the pairs (image b, text b)."""
    return self.match_outputs(text_tokens, text_mask, image_tokens, deterministic)[0]

  def match_outputs(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
                    deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """(ITM logits float32 [B, 2] ([:, 0] = match), the pooled fused feature float32 [B, D]) of
    the pairs (image b, text b): a single-stream teacher's outputs (MCAD H^SS, paper 001 eq. 12)."""
    pooled = self.pool_fused(self.fuse(text_tokens, text_mask, image_tokens, deterministic),
                             text_mask)
    return self.itm_head(pooled), pooled.astype(jnp.float32)

  def mlm_logits(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
                 deterministic: bool = True) -> jax.Array:
    """MLM logits float32 [B, L, vocab_size] at every text position."""
    return self.mlm_head(self.fuse(text_tokens, text_mask, image_tokens, deterministic))

  def mlm_logits_at(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
                    positions: jax.Array, deterministic: bool = True) -> jax.Array:
    """MLM logits float32 [N, vocab_size] at `positions` int32 [N], indices into the flattened
    [B * L] text positions: the vocabulary head runs on the N masked positions only."""
    fused = self.fuse(text_tokens, text_mask, image_tokens, deterministic)
    return self.mlm_head(fused.reshape(-1, fused.shape[-1])[positions][None])[0]

  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Runs every submodule (so `init` creates all params) -> dict of all outputs."""
    image_emb, image_tokens = self.encode_image(images, deterministic)
    text_emb, text_tokens = self.encode_text(ids, mask, deterministic)
    fused = self.fuse(text_tokens, mask, image_tokens, deterministic)
    return dict(image_emb=image_emb, text_emb=text_emb, temperature=self.temperature(),
                match_logits=self.itm_head(self.pool_fused(fused, mask)),
                mlm_logits=self.mlm_head(fused))


def build_model(model_cfg) -> LoopITRModel:
  """LoopITRModel from a `model` ConfigDict (or any mapping) holding CONFIG_FIELDS (and the
  tower / cross-encoder fields it selects) and, optionally, dtype ("float32" | "bfloat16",
  computation only)."""
  missing = [f for f in CONFIG_FIELDS if f not in model_cfg]
  if missing:
    raise ValueError(f"model config lacks {', '.join(missing)}: set config.model.{missing[0]} "
                     "(see jaxdistill/config.py for the defaults)")
  dtype = model_cfg.get("dtype", "float32")
  if dtype not in MODEL_DTYPES:
    raise ValueError(f"--config.model.dtype={dtype!r} is not valid: use one of "
                     f"{', '.join(MODEL_DTYPES)}")
  fields = {k: v for k, v in dict(model_cfg).items() if k != "dtype"}
  return LoopITRModel(ml_collections.FrozenConfigDict(fields), dtype=jnp.dtype(dtype))
