"""BLIP's image-text retrieval model in the transformers `BlipForImageTextRetrieval` layout
(paper 002's cross-encoder teacher; ALBEF checkpoints map onto the same modules, albef.py).

- vision_model: transformers' BlipVisionModel (class token, patch conv, pre-LN layers, final
  post_layernorm) is hf_vit.ImageEncoder once its fused qkv projection is split (split_qkv).
  images [B, H, W, 3] -> tokens [B, M, Dv].
- text_encoder: `Bert` with cross-attention to the image tokens in layers >= fusion_layer (0 for
  BLIP: every layer; ALBEF: 6).
- ITC: vision_proj / text_proj of the [CLS] tokens, L2-normalised; unimodal text runs the first
  text_layers layers without the image (BLIP: all; ALBEF: fusion_layer).
- ITM: itm_head on the fused [CLS]: logits [B, 2], index 1 = match (BLIP's and ALBEF's labels).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models.bert import Bert
from jaxdistill.models.dual import l2_normalize
from jaxdistill.models.hf_vit import ImageEncoder
from jaxdistill.pretrained import bert
from jaxdistill.pretrained.checkpoint import (CheckpointError, StateDict, map_state_dict,
                                              read_state_dict)

# BlipVisionModel keys (after split_qkv) -> hf_vit.ImageEncoder's Flax names.
VISION_RULES = (
    (r"^vision_model\.embeddings\.class_embedding$", "vision_model.cls_token"),
    (r"^vision_model\.embeddings\.", "vision_model."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.", r"vision_model.encoder.layer_\1."),
    (r"\.layer_norm1\.", ".ln_attn."),
    (r"\.layer_norm2\.", ".ln_mlp."),
    (r"\.self_attn\.projection\.", ".attention.out."),
    (r"\.self_attn\.(query|key|value)\.", r".attention.\1."),
    (r"\.mlp\.(fc1|fc2)\.", r".\1."),
    (r"^vision_model\.post_layernorm\.", "vision_model.final_norm."),
)
RULES = (*VISION_RULES, *bert.RULES, bert.TO_PATH)
QKV = re.compile(r"^(.*)\.self_attn\.qkv\.(weight|bias)$")
IGNORE = bert.IGNORE

# transformers' BlipTextConfig / BlipVisionConfig / BlipConfig defaults: a saved config.json
# omits some values equal to them.
TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768,
                     intermediate_size=3072, num_hidden_layers=12, num_attention_heads=8,
                     max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=384, patch_size=16, hidden_act="gelu",
                       layer_norm_eps=1e-5)
EMBED_DIM_DEFAULT = 256


class BlipRetrieval(nn.Module):
  """Vision tower + text/fusion encoder + ITC projections + ITM head.

  __call__(images, ids, mask) -> (itm_logits [B, 2], image_embed [B, E], text_embed [B, E]) for
  aligned pairs; the methods below give each part (module.apply(..., method=...)).
  """
  vision_model: ImageEncoder
  text_encoder: Bert
  embed_dim: int
  text_layers: int | None = None
  dtype: Any = jnp.float32

  def setup(self):
    dense = lambda n: nn.Dense(n, dtype=self.dtype)
    self.vision_proj = dense(self.embed_dim)
    self.text_proj = dense(self.embed_dim)
    self.itm_head = dense(2)

  def image_tokens(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> image tokens [B, M, Dv] (the cross encoder's context)."""
    return self.vision_model(images)[0]

  def image_embed(self, image_tokens: jax.Array) -> jax.Array:
    """image tokens [B, M, Dv] -> L2-normalised ITC embedding [B, E]."""
    return l2_normalize(self.vision_proj(image_tokens[:, 0]))

  def text_embed(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids, mask [B, L] -> L2-normalised ITC embedding [B, E] (unimodal text layers only)."""
    tokens = self.text_encoder(ids, mask, stop_layer=self.text_layers)
    return l2_normalize(self.text_proj(tokens[:, 0]))

  def itm_logits(self, image_tokens: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """image tokens [B, M, Dv], ids and mask [B, L] (pairs) -> ITM logits [B, 2], 1 = match."""
    fused = self.text_encoder(ids, mask, context=image_tokens,
                              context_mask=jnp.ones(image_tokens.shape[:2], jnp.int32))
    return self.itm_head(fused[:, 0]).astype(jnp.float32)

  def itm_score(self, image_tokens: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """P(match) [B] = softmax(itm_logits)[:, 1] (the score BLIP/ALBEF re-rank with)."""
    return jax.nn.softmax(self.itm_logits(image_tokens, ids, mask), axis=-1)[:, 1]

  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    tokens = self.image_tokens(images)
    return (self.itm_logits(tokens, ids, mask), self.image_embed(tokens),
            self.text_embed(ids, mask))


def build(text_config: dict[str, Any], vision_config: dict[str, Any], embed_dim: int,
          fusion_layer: int = 0, text_layers: int | None = None,
          dtype: Any = jnp.float32) -> BlipRetrieval:
  """Config dicts (BlipTextConfig / BlipVisionConfig fields; defaults filled) -> BlipRetrieval."""
  text = {**TEXT_DEFAULTS, **text_config}
  vision = {**VISION_DEFAULTS, **vision_config}
  vision_model = ImageEncoder(
      image_size=vision["image_size"], patch_size=vision["patch_size"],
      hidden_size=vision["hidden_size"], num_layers=vision["num_hidden_layers"],
      num_heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
      activation=vision["hidden_act"], layer_norm_eps=vision["layer_norm_eps"], dtype=dtype)
  text_encoder = bert.from_config(text, fusion_layer=fusion_layer, dtype=dtype)
  return BlipRetrieval(vision_model, text_encoder, embed_dim, text_layers, dtype)


def split_qkv(state: StateDict) -> StateDict:
  """BLIP's fused self_attn.qkv [3D, D] (rows: query, key, value) -> self_attn.query/key/value."""
  out = {}
  for key, value in state.items():
    if m := QKV.match(key):
      for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
        out[f"{m.group(1)}.self_attn.{name}.{m.group(2)}"] = part
    else:
      out[key] = value
  return out


def abstract_params(module: BlipRetrieval) -> Any:
  """BlipRetrieval -> its param tree of jax.ShapeDtypeStruct (nothing is computed)."""
  size = module.vision_model.image_size
  images = jnp.zeros((1, size, size, 3), module.dtype)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(module.init, jax.random.key(0), images, ids, ids)["params"]


def load(path: str, config: dict[str, Any] | None, dtype: Any = jnp.float32
         ) -> tuple[BlipRetrieval, dict[str, Any]]:
  """HF BlipForImageTextRetrieval checkpoint (directory or file + config.json) -> (module,
  params)."""
  if config is None:
    raise CheckpointError(f"{path}: a BLIP checkpoint needs its config.json (text_config, "
                          "vision_config); save the model with save_pretrained()")
  module = build(config.get("text_config", {}), config.get("vision_config", {}),
                 config.get("image_text_hidden_size", EMBED_DIM_DEFAULT), dtype=dtype)
  return module, map_state_dict(split_qkv(read_state_dict(path)), RULES,
                                abstract_params(module), IGNORE)
