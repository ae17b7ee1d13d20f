"""CLIP (Radford et al. 2021) in the Hugging Face `CLIPModel` layout: the dual-encoder teacher
of paper 001 (MCAD's dual-stream teacher) and the kind of model papers 000 and 004 distil.

Both towers are pre-LN transformers (models/hf_vit.PreNormEncoder) with QuickGELU
(x * sigmoid(1.702 x)) or whatever the config's hidden_act names:
- vision: patch conv without bias, [CLS] + absolute positions, pre-LayerNorm ("pre_layrnorm"),
  encoder; pooled = post-LayerNorm([CLS]); the tokens are the encoder's output, un-normalised.
- text: token + absolute position embeddings, causal self-attention (also masking padding),
  final LayerNorm; pooled = the [EOS] token (transformers CLIPTextTransformer): the first
  position of eos_token_id, or the argmax of the ids for old configs whose eos_token_id is 2
  (there the EOS id 49407 is the largest id).
Embeddings: Dense projections without bias, L2-normalised; logits = exp(logit_scale) * cosine.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models.dual import l2_normalize
from jaxdistill.models.hf_vit import ImageEncoder, PreNormEncoder
from jaxdistill.pretrained.checkpoint import (CheckpointError, map_state_dict, read_state_dict,
                                              select_layers)

LEGACY_EOS_TOKEN_ID = 2  # configs before transformers PR #24773: pool at argmax(ids)


class TextEncoder(nn.Module):
  """ids int [B, L], mask [B, L] (1 = real token) or None -> (tokens [B, L, D] after the final
  LayerNorm, pooled [B, D] = the EOS token)."""
  vocab_size: int
  max_positions: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank(ids, 2)
    batch, length = ids.shape
    if length > self.max_positions:
      raise ValueError(f"text length {length} exceeds max_position_embeddings="
                       f"{self.max_positions}: truncate the token ids to {self.max_positions}")
    x = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                 name="token_embedding")(ids)
    positions = self.param("position_embedding", nn.initializers.normal(stddev=0.01),
                           (self.max_positions, self.hidden_size))
    x = x + positions[:length].astype(x.dtype)
    attention_mask = nn.make_causal_mask(ids, dtype=bool)
    if mask is not None:
      chex.assert_shape(mask, (batch, length))
      attention_mask = nn.combine_masks(
          attention_mask, nn.make_attention_mask(jnp.ones_like(mask), mask, dtype=bool))
    x = PreNormEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.activation,
                       self.layer_norm_eps, dtype=self.dtype, name="encoder")(x, attention_mask)
    x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="final_norm")(x)
    if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos = jnp.argmax(ids, axis=-1)
    else:
      eos = jnp.argmax(ids == self.eos_token_id, axis=-1)
    return x, x[jnp.arange(batch), eos]


class CLIP(nn.Module):
  """Vision tower + text tower + bias-free projections to projection_dim + logit_scale.

  embed_images: images [B, H, W, C] (NHWC, CLIP-normalised) -> [B, E] unit-norm.
  embed_texts: ids [B, L], mask [B, L] -> [B, E] unit-norm.
  __call__: -> logits_per_image [B_img, B_txt] = exp(logit_scale) * cosine (creates all params).
  """
  vision: ImageEncoder
  text: TextEncoder
  projection_dim: int = 512
  logit_scale_init: float = 2.6592  # log(1 / 0.07)
  dtype: Any = jnp.float32

  def setup(self):
    dense = functools.partial(nn.Dense, self.projection_dim, use_bias=False, dtype=self.dtype)
    self.visual_projection = dense()
    self.text_projection = dense()
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init),
                                  ())

  def embed_images(self, images: jax.Array) -> jax.Array:
    _, pooled = self.vision(images)
    return l2_normalize(self.visual_projection(pooled).astype(jnp.float32))

  def embed_texts(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    _, pooled = self.text(ids, mask)
    return l2_normalize(self.text_projection(pooled).astype(jnp.float32))

  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    image_emb, text_emb = self.embed_images(images), self.embed_texts(ids, mask)
    return jnp.exp(self.logit_scale) * image_emb @ text_emb.T


def embed_images(model: CLIP, params: Any, images: jax.Array) -> jax.Array:
  """Pure function: images [B, H, W, C] -> unit-norm embeddings [B, E]."""
  return model.apply({"params": params}, images, method=CLIP.embed_images)


def embed_texts(model: CLIP, params: Any, ids: jax.Array, mask: jax.Array | None = None
                ) -> jax.Array:
  """Pure function: ids [B, L], mask [B, L] -> unit-norm embeddings [B, E]."""
  return model.apply({"params": params}, ids, mask, method=CLIP.embed_texts)


def clip_from_config(config: dict[str, Any], dtype: Any = jnp.float32) -> CLIP:
  """HF CLIPConfig dict (config.json; sub-config fields at their defaults may be absent) ->
  CLIP with transformers' CLIPTextConfig / CLIPVisionConfig defaults."""
  if config.get("model_type") != "clip":
    raise CheckpointError(f"model_type {config.get('model_type')!r} is not 'clip': pass a "
                          "CLIPModel checkpoint")
  text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
  image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 32)
  if image_size % patch_size:
    raise CheckpointError(f"vision_config image_size={image_size} is not divisible by "
                          f"patch_size={patch_size}: fix the config")
  vision_tower = ImageEncoder(
      image_size=image_size, patch_size=patch_size, hidden_size=vision.get("hidden_size", 768),
      num_layers=vision.get("num_hidden_layers", 12),
      num_heads=vision.get("num_attention_heads", 12),
      mlp_dim=vision.get("intermediate_size", 3072),
      activation=vision.get("hidden_act", "quick_gelu"),
      layer_norm_eps=vision.get("layer_norm_eps", 1e-5), patch_bias=False, pre_norm=True,
      final_norm=False, pool="cls", pool_norm=True, dtype=dtype)
  text_tower = TextEncoder(
      vocab_size=text.get("vocab_size", 49408),
      max_positions=text.get("max_position_embeddings", 77),
      hidden_size=text.get("hidden_size", 512), num_layers=text.get("num_hidden_layers", 12),
      num_heads=text.get("num_attention_heads", 8), mlp_dim=text.get("intermediate_size", 2048),
      activation=text.get("hidden_act", "quick_gelu"),
      layer_norm_eps=text.get("layer_norm_eps", 1e-5),
      eos_token_id=text.get("eos_token_id", 49407), dtype=dtype)
  return CLIP(vision_tower, text_tower, config.get("projection_dim", 512),
              config.get("logit_scale_init_value", 2.6592), dtype)


_LAYERS = {"vision": r"^vision_model\.encoder\.layers\.(\d+)\.",
           "text": r"^text_model\.encoder\.layers\.(\d+)\."}
_RULES = (
    (r"^vision_model\.", "vision/"),
    (r"^text_model\.", "text/"),
    (r"/embeddings\.patch_embedding\.", "/patch_embedding/"),
    (r"/embeddings\.class_embedding$", "/cls_token"),
    (r"^vision/embeddings\.position_embedding\.weight$", "vision/position_embedding"),
    (r"^text/embeddings\.position_embedding\.weight$", "text/position_embedding"),
    (r"/embeddings\.token_embedding\.", "/token_embedding/"),
    (r"/pre_layrnorm\.", "/pre_norm/"),
    (r"/post_layernorm\.", "/pool_norm/"),
    (r"/final_layer_norm\.", "/final_norm/"),
    (r"/encoder\.layers\.(\d+)\.", r"/encoder/layer_\1/"),
    (r"/self_attn\.q_proj\.", "/attention/query/"),
    (r"/self_attn\.k_proj\.", "/attention/key/"),
    (r"/self_attn\.v_proj\.", "/attention/value/"),
    (r"/self_attn\.out_proj\.", "/attention/out/"),
    (r"/layer_norm1\.", "/ln_attn/"),
    (r"/layer_norm2\.", "/ln_mlp/"),
    (r"/mlp\.(fc1|fc2)\.", r"/\1/"),
    (r"^(visual_projection|text_projection)\.", r"\1/"),
)
_IGNORE = (r"position_ids$",)


def _to_module_shapes(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """CLIP stores the vision [CLS] as [D] and its positions as an nn.Embedding [P+1, D];
  ImageEncoder holds them as [1, 1, D] and [1, P+1, D]."""
  out = dict(state_dict)
  for key in ("vision_model.embeddings.class_embedding",
              "vision_model.embeddings.position_embedding.weight"):
    if key in out:
      out[key] = out[key].reshape((1,) * (3 - out[key].ndim) + out[key].shape)
  return out


def load(path: str, config: dict[str, Any] | None, layers: str | None = None,
         dtype: Any = jnp.float32) -> tuple[CLIP, dict[str, Any]]:
  """CLIPModel checkpoint (HF dir or file + config) -> (CLIP, params). layers: None (all) |
  "first:N" | "last:N" | "i,j,k" of both towers, renumbered 0..n-1 (checkpoint.layer_indices;
  papers 000, 004 initialise students that way); dtype is the compute dtype (params stay
  float32)."""
  if config is None:
    raise CheckpointError(f"{path} has no config.json: CLIP needs the Hugging Face config; "
                          "save the model with save_pretrained()")
  state_dict = read_state_dict(path)
  if layers is not None:
    for tower, pattern in _LAYERS.items():
      state_dict, kept = select_layers(state_dict, pattern, layers)
      sub = f"{tower}_config"
      config = {**config, sub: {**(config.get(sub) or {}), "num_hidden_layers": len(kept)}}
  model = clip_from_config(config, dtype)
  size = model.vision.image_size
  channels = (config.get("vision_config") or {}).get("num_channels", 3)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, size, size, channels)),
                            jnp.zeros((1, 2), jnp.int32))["params"]
  return model, map_state_dict(_to_module_shapes(state_dict), _RULES, expected, ignore=_IGNORE)
