"""ALBEF's published checkpoints (github.com/salesforce/ALBEF, paper 003; the cross-encoder
teacher of paper 001) mapped onto the BLIP modules of blip.py.

A checkpoint is a .pth {"model": state_dict} with: `visual_encoder.*` (ALBEF's timm-style ViT:
cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}, norm; LayerNorm eps 1e-6), `text_encoder.[bert.]*` (BERT-base whose layers >=
fusion_layer = 6 carry `crossattention`), `vision_proj`, `text_proj`, `itm_head`; the momentum
copies `*_m.*`, the queues, `temp` and the MLM head `text_encoder.cls.*` are dropped.
TO_BLIP renames the keys to the BlipForImageTextRetrieval layout (table in docs/pretrained.md);
the sizes come from the tensor shapes, the head counts from width / 64 (ALBEF's ViT-B/16 and
BERT-base) unless given. Unimodal text (ITC) runs the first fusion_layer layers, as ALBEF's
mode='text'.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from jaxdistill.pretrained import blip
from jaxdistill.pretrained.checkpoint import (CheckpointError, StateDict, map_state_dict,
                                              read_state_dict)

TO_BLIP = (
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.", r"vision_model.encoder.layers.\1."),
    (r"^(vision_model\.encoder\.layers\.\d+)\.norm(1|2)\.", r"\1.layer_norm\2."),
    (r"^(vision_model\.encoder\.layers\.\d+)\.attn\.qkv\.", r"\1.self_attn.qkv."),
    (r"^(vision_model\.encoder\.layers\.\d+)\.attn\.proj\.", r"\1.self_attn.projection."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^text_encoder\.bert\.", "text_encoder."),
)
IGNORE = (*blip.IGNORE, r"^\w+_m\.", r"queue", r"^temp$", r"^text_encoder\.cls\.")
VISION_LAYER_NORM_EPS = 1e-6  # ALBEF's ViT: partial(nn.LayerNorm, eps=1e-6)
HEAD_WIDTH = 64


def _shape(state: StateDict, key: str) -> tuple[int, ...]:
  if key not in state:
    raise CheckpointError(f"ALBEF checkpoint has no '{key}': is this an ALBEF model "
                          "checkpoint (visual_encoder.*, text_encoder.*)?")
  return state[key].shape


def _count(state: StateDict, pattern: str) -> list[int]:
  return sorted({int(m.group(1)) for k in state if (m := re.search(pattern, k))})


def _configs(state: StateDict, text_heads: int | None, vision_heads: int | None,
             text_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int, int]:
  """BLIP-named state dict -> (text config, vision config, embed_dim, fusion_layer) from the
  tensor shapes."""
  pos = _shape(state, "vision_model.embeddings.position_embedding")
  patch = _shape(state, "vision_model.embeddings.patch_embedding.weight")
  grid = round((pos[1] - 1) ** 0.5)
  vision = dict(hidden_size=pos[2],
                num_hidden_layers=len(_count(state, r"^vision_model\.encoder\.layers\.(\d+)\.")),
                num_attention_heads=vision_heads or pos[2] // HEAD_WIDTH,
                intermediate_size=_shape(state, "vision_model.encoder.layers.0.mlp.fc1.weight")[0],
                image_size=grid * patch[-1], patch_size=patch[-1],
                layer_norm_eps=VISION_LAYER_NORM_EPS)
  words = _shape(state, "text_encoder.embeddings.word_embeddings.weight")
  types = state.get("text_encoder.embeddings.token_type_embeddings.weight")
  layer = "text_encoder.encoder.layer"
  cross = _count(state, rf"^{re.escape(layer)}\.(\d+)\.crossattention\.")
  if not cross:
    raise CheckpointError("ALBEF checkpoint has no text_encoder.encoder.layer.N.crossattention "
                          "keys: it holds no fusion layers to match images and texts with")
  text = dict(
      vocab_size=words[0], hidden_size=words[1],
      num_hidden_layers=len(_count(state, rf"^{re.escape(layer)}\.(\d+)\.")),
      num_attention_heads=text_heads or text_config.get("num_attention_heads",
                                                        words[1] // HEAD_WIDTH),
      intermediate_size=_shape(state, f"{layer}.0.intermediate.dense.weight")[0],
      max_position_embeddings=_shape(state,
                                     "text_encoder.embeddings.position_embeddings.weight")[0],
      type_vocab_size=0 if types is None else types.shape[0],
      layer_norm_eps=text_config.get("layer_norm_eps", 1e-12))
  return text, vision, _shape(state, "vision_proj.weight")[0], cross[0]


def load(path: str, config: dict[str, Any] | None, text_heads: int | None = None,
         vision_heads: int | None = None, dtype: Any = jnp.float32
         ) -> tuple[blip.BlipRetrieval, dict[str, Any]]:
  """ALBEF .pth (or a state dict file in its layout) -> (BlipRetrieval, params).

  config: ALBEF's config_bert.json as a dict (num_attention_heads, layer_norm_eps), or None;
  text_heads / vision_heads override the head counts.
  """
  state = {}
  for key, value in read_state_dict(path).items():
    for pattern, replacement in TO_BLIP:
      key = re.sub(pattern, replacement, key)
    state[key] = value
  text, vision, embed_dim, fusion_layer = _configs(state, text_heads, vision_heads, config or {})
  module = blip.build(text, vision, embed_dim, fusion_layer=fusion_layer,
                      text_layers=fusion_layer, dtype=dtype)
  return module, map_state_dict(blip.split_qkv(state), blip.RULES, blip.abstract_params(module),
                                IGNORE)
