"""Hugging Face `BertModel` checkpoints (BERT, MiniLM, TinyBERT; paper 004's teacher and the
MiniLM/TinyBERT-size student initialisations of papers 000, 001) -> models/bert.Bert: key-mapping
rules, config parsing and the loader.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdistill.models.bert import Bert
from jaxdistill.pretrained.checkpoint import (CheckpointError, map_state_dict, read_state_dict,
                                              select_layers)

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


def load(path: str, config: dict[str, Any] | None, layers: str | None = None,
         dtype: Any = jnp.float32) -> tuple[Bert, dict[str, Any]]:
  """HF BertModel checkpoint (or BertFor* with a 'bert.' prefix) -> (Bert, params).

  layers: None (all) | "first:N" | "last:N" | "i,j,k", renumbered 0..n-1
  (checkpoint.layer_indices; papers 000, 004 initialise students from the first N layers).
  """
  if config is None:
    raise CheckpointError(f"{path}: a BERT checkpoint needs its config.json (vocab, widths, "
                          "layers, heads); save the model with save_pretrained()")
  state = read_state_dict(path)
  overrides = {}
  if layers is not None:
    state, kept = select_layers(state, LAYER_PATTERN, layers)
    overrides["num_layers"] = len(kept)
  module = from_config(config, dtype=dtype, **overrides)
  return module, map_state_dict(state, ((r"^bert\.", ""), *RULES, TO_PATH),
                                abstract_params(module), IGNORE)


def abstract_params(module: Bert, context_width: int | None = None) -> Any:
  """Bert -> its param tree of jax.ShapeDtypeStruct (nothing is computed); context_width: the
  width of the tokens its cross-attention layers attend to."""
  ids = jnp.zeros((1, 1), jnp.int32)
  context = None if context_width is None else jnp.zeros((1, 1, context_width), module.dtype)
  return jax.eval_shape(module.init, jax.random.key(0), ids, ids, context=context)["params"]
