"""BERT in the Hugging Face `BertModel` layout (BERT, MiniLM, TinyBERT; paper 004's teacher and
the MiniLM/TinyBERT-size student initialisations of papers 000, 001), CLS and mean pooling.

Post-LN layers (Devlin et al.): x = LN(x + SelfAttn(x)); [x = LN(x + CrossAttn(x, context))];
x = LN(x + FFN(x)). Layers >= fusion_layer carry the cross-attention sub-layer of BLIP's text
encoder / ALBEF's fusion layers (papers 002, 003); it runs only when a context is given, as in
transformers' BlipTextLayer.

ids int32 [B, L], mask [B, L] (1 = real token) -> tokens [B, L, D].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.pretrained.checkpoint import (CheckpointError, map_state_dict, read_state_dict,
                                              truncate_layers)
from jaxdistill.pretrained.layers import activation

# Torch BertModel key -> Flax path (prefix-agnostic, so BLIP's and ALBEF's text encoders reuse
# them); the final '.' -> '/' rule is TO_PATH, appended by each loader after its own rules.
RULES = (
    (r"embeddings\.LayerNorm", "embeddings_ln"),
    (r"embeddings\.(word|position|token_type)_embeddings", r"\1_embeddings"),
    (r"encoder\.layer\.(\d+)\.", r"layer_\1."),
    (r"(attention|crossattention)\.self\.", r"\1."),
    (r"(attention|crossattention)\.output\.dense", r"\1.out"),
    (r"(attention|crossattention)\.output\.LayerNorm", r"\1_ln"),
    (r"intermediate\.dense", "intermediate"),
    (r"output\.dense", "output"),
    (r"output\.LayerNorm", "output_ln"),
)
TO_PATH = (r"\.", "/")
LAYER_PATTERN = r"encoder\.layer\.(\d+)\."
# Buffers and heads the encoder does not use: position ids, the tanh pooler, pre-training heads.
IGNORE = (r"position_ids$", r"(^|\.)pooler\.", r"^cls\.")


class BertAttention(nn.Module):
  """Multi-head attention, HF layout (query/key/value/out): x [B, L, D] attends to context
  [B, M, Dc]; key_mask [B, M] (1 = attend) or None -> [B, L, D]."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"hidden size {width} is not divisible by num_attention_heads="
                       f"{self.num_heads}: fix the config")
    heads = lambda name, y: nn.Dense(width, dtype=self.dtype, name=name)(y).reshape(
        *y.shape[:2], self.num_heads, width // self.num_heads)
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    y = nn.dot_product_attention(heads("query", x), heads("key", context),
                                 heads("value", context), mask=mask, dtype=self.dtype)
    return nn.Dense(width, dtype=self.dtype, name="out")(y.reshape(x.shape))


class BertLayer(nn.Module):
  """One post-LN layer, optionally with cross-attention: x [B, L, D] -> [B, L, D]."""
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  hidden_act: str
  cross_attention: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    x = ln("attention_ln")(x + BertAttention(self.num_heads, self.dtype, name="attention")(
        x, x, mask))
    if self.cross_attention and context is not None:
      x = ln("crossattention_ln")(x + BertAttention(self.num_heads, self.dtype,
                                                    name="crossattention")(x, context,
                                                                           context_mask))
    y = activation(self.hidden_act)(
        nn.Dense(self.intermediate_size, dtype=self.dtype, name="intermediate")(x))
    return ln("output_ln")(x + nn.Dense(x.shape[-1], dtype=self.dtype, name="output")(y))


class Bert(nn.Module):
  """Embeddings (word + position [+ token type], LayerNorm) and num_layers BertLayers.

  fusion_layer: first layer with cross-attention (None: none). __call__(ids, mask,
  token_type_ids=None, context=None, context_mask=None, stop_layer=None) runs layers
  [0, stop_layer) (default all) -> tokens [B, L, D].
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  fusion_layer: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None,
               context: jax.Array | None = None, context_mask: jax.Array | None = None,
               stop_layer: int | None = None) -> jax.Array:
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"Bert expects ids and mask of the same shape [B, L]; got {ids.shape} "
                       f"and {mask.shape}")
    if ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"text length {ids.shape[1]} exceeds max_position_embeddings="
                       f"{self.max_position_embeddings}: truncate the ids")
    embed = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype, name=name)
    x = embed(self.vocab_size, "word_embeddings")(ids)
    x = x + embed(self.max_position_embeddings, "position_embeddings")(
        jnp.arange(ids.shape[1])[None])
    if self.type_vocab_size:
      types = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
      x = x + embed(self.type_vocab_size, "token_type_embeddings")(types)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="embeddings_ln")(x)
    for i in range(self.num_layers if stop_layer is None else stop_layer):
      cross = self.fusion_layer is not None and i >= self.fusion_layer
      x = BertLayer(self.num_heads, self.intermediate_size, self.layer_norm_eps, self.hidden_act,
                    cross, self.dtype, name=f"layer_{i}")(x, mask, context, context_mask)
    return x


def cls_pool(tokens: jax.Array) -> jax.Array:
  """tokens [B, L, D] -> [B, D]: the [CLS] (first) token."""
  return tokens[:, 0]


def mean_pool(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """tokens [B, L, D], mask [B, L] -> [B, D]: mean over real tokens (sentence-transformers)."""
  weights = mask.astype(tokens.dtype)[..., None]
  return (tokens * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)


def from_config(config: dict[str, Any], **overrides: Any) -> Bert:
  """HF BertConfig / BlipTextConfig dict -> Bert (overrides: fusion_layer, num_layers, dtype)."""
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise CheckpointError(f"position_embedding_type={config['position_embedding_type']!r} is not "
                          "supported: only 'absolute' position embeddings are implemented")
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings")
  if missing := [k for k in required if k not in config]:
    raise CheckpointError(f"BERT config lacks {missing}: pass the model's full config.json "
                          "(transformers BertConfig.to_dict())")
  fields = dict(
      vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
      num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
      intermediate_size=config["intermediate_size"],
      max_position_embeddings=config["max_position_embeddings"],
      type_vocab_size=config.get("type_vocab_size", 0),
      layer_norm_eps=config.get("layer_norm_eps", 1e-12),
      hidden_act=config.get("hidden_act", "gelu"))
  return Bert(**{**fields, **overrides})


def load(path: str, config: dict[str, Any] | None, num_layers: int | None = None,
         dtype: Any = jnp.float32) -> tuple[Bert, dict[str, Any]]:
  """HF BertModel checkpoint (or BertFor* with a 'bert.' prefix) -> (Bert, params).

  num_layers keeps the first N layers (papers 000, 004 initialise students that way).
  """
  if config is None:
    raise CheckpointError(f"{path}: a BERT checkpoint needs its config.json (vocab, widths, "
                          "layers, heads); save the model with save_pretrained()")
  state = read_state_dict(path)
  if num_layers is not None:
    state = truncate_layers(state, LAYER_PATTERN, num_layers)
  module = from_config(config, dtype=dtype,
                       **({} if num_layers is None else {"num_layers": num_layers}))
  return module, map_state_dict(state, ((r"^bert\.", ""), *RULES, TO_PATH),
                                abstract_params(module), IGNORE)


def abstract_params(module: Bert, context_width: int | None = None) -> Any:
  """Bert -> its param tree of jax.ShapeDtypeStruct (nothing is computed); context_width: the
  width of the tokens its cross-attention layers attend to."""
  ids = jnp.zeros((1, 1), jnp.int32)
  context = None if context_width is None else jnp.zeros((1, 1, context_width), module.dtype)
  return jax.eval_shape(module.init, jax.random.key(0), ids, ids, context=context)["params"]
