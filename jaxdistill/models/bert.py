"""BERT in the Hugging Face `BertModel` layout (BERT, MiniLM, TinyBERT; paper 004's teacher and
the MiniLM/TinyBERT-size student initialisations of papers 000, 001), CLS and mean pooling, and
the activations by their Hugging Face `hidden_act` names. Checkpoint mapping: pretrained/bert.py.

Post-LN layers (Devlin et al.): x = LN(x + SelfAttn(x)); [x = LN(x + CrossAttn(x, context))];
x = LN(x + FFN(x)). Layers >= fusion_layer carry the cross-attention sub-layer of BLIP's text
encoder / ALBEF's fusion layers (papers 002, 003); it runs only when a context is given, as in
transformers' BlipTextLayer. No dropout (inference layout).

ids int32 [B, L], mask [B, L] (1 = real token) -> tokens [B, L, D].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.layers import remat_block

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact erf GELU (torch nn.GELU())
    "gelu_new": lambda x: nn.gelu(x, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "tanh": jnp.tanh,  # ViT's pooler_act
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Hugging Face `hidden_act` name -> function."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}: supported are {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class BertAttention(nn.Module):
  """Multi-head attention, HF layout (query/key/value/out): x [B, L, D] attends to context
  [B, M, Dc]; key_mask [B, M] (1 = attend) or None -> [B, L, D]."""
  num_heads: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"hidden size {width} is not divisible by num_attention_heads="
                       f"{self.num_heads}: fix the config")
    dense = lambda name: nn.Dense(width, dtype=self.dtype, kernel_init=self.kernel_init, name=name)
    heads = lambda name, y: dense(name)(y).reshape(*y.shape[:2], self.num_heads,
                                                   width // self.num_heads)
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    y = nn.dot_product_attention(heads("query", x), heads("key", context),
                                 heads("value", context), mask=mask, dtype=self.dtype)
    return dense("out")(y.reshape(x.shape))


class BertLayer(nn.Module):
  """One post-LN layer, optionally with cross-attention: x [B, L, D] -> [B, L, D]."""
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  hidden_act: str
  cross_attention: bool = False
  dtype: Any = jnp.float32
  cross_kernel_init: Any = nn.linear.default_kernel_init
  cross_gate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    x = ln("attention_ln")(x + BertAttention(self.num_heads, self.dtype, name="attention")(
        x, x, mask))
    if self.cross_attention and context is not None:
      y = BertAttention(self.num_heads, self.dtype, self.cross_kernel_init,
                        name="crossattention")(x, context, context_mask)
      if self.cross_gate:   # Flamingo's tanh gate, 0 at init, and no LayerNorm: x unchanged
        x = x + jnp.tanh(self.param("crossattention_gate", nn.initializers.zeros, ())).astype(
            y.dtype) * y
      else:
        x = ln("crossattention_ln")(x + y)
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
  remat: str = "none"   # config.model.remat: each layer (models/layers.remat_block)

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
    layer = remat_block(BertLayer, self.remat)
    for i in range(self.num_layers if stop_layer is None else stop_layer):
      cross = self.fusion_layer is not None and i >= self.fusion_layer
      x = layer(self.num_heads, self.intermediate_size, self.layer_norm_eps, self.hidden_act,
                cross, self.dtype, name=f"layer_{i}")(x, mask, context, context_mask)
    return x


# The sub-layers of a BertLayer that a BertModel checkpoint supplies (BertFusion's crossattention
# and crossattention_ln are new); a regex alternation over its param names.
CHECKPOINT_SUBLAYERS = "attention|attention_ln|intermediate|output|output_ln"


class BertFusion(nn.Module):
  """The fusion half of ALBEF / LoopITR's cross encoder (paper 003 §4: BERT's last layers with
  cross-attention added): num_layers post-LN BertLayers, each with a cross-attention
  sub-layer over the image tokens, on the text encoder's output tokens (no embeddings).

  text_tokens [B, L, D], text_mask [B, L], image_tokens [B, M, Dv] (keys / values project Dv
  to D) -> fused [B, L, D]. Params layer_<i>/{attention, attention_ln, crossattention,
  crossattention_ln, intermediate, output, output_ln}: the CHECKPOINT_SUBLAYERS map from a
  BertModel's layers (train/init.py; configs/loopitr.py). No dropout.
  cross_init_std: 0 = the new cross-attention's Dense kernels take Flax's default (LeCun normal,
  std 1/sqrt(fan_in)); > 0 = normal(0, cross_init_std), as HF BERT initialises every Linear
  (initializer_range, 0.02), so that the image enters the text stream gently at the start.
  cross_gate: x + tanh(g) * CrossAttn(x, image) with g a learnt scalar starting at 0 and no
  crossattention_ln (Flamingo, Alayrac et al. 2022, eq. 1): at the start the layers compute
  exactly the checkpoint's text layers, and the image enters as training opens the gate.
  """
  num_layers: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32
  cross_init_std: float = 0.0
  cross_gate: bool = False
  remat: str = "none"   # config.model.remat: each layer (models/layers.remat_block)

  @nn.compact
  def __call__(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
               deterministic: bool = True) -> jax.Array:
    del deterministic
    x = text_tokens
    init = (nn.initializers.normal(self.cross_init_std) if self.cross_init_std > 0
            else nn.linear.default_kernel_init)
    layer = remat_block(BertLayer, self.remat)
    for i in range(self.num_layers):
      x = layer(self.num_heads, self.intermediate_size, self.layer_norm_eps, self.hidden_act,
                True, self.dtype, init, self.cross_gate, name=f"layer_{i}")(
                    x, text_mask, image_tokens, None)
    return x


class BertSingleStream(nn.Module):
  """A single-stream cross encoder (paper 001's name for ALBEF-like teachers; the ViLT / UNITER
  layout): BERT's last layers as self-attention over the caption tokens followed by the image
  tokens, so that words and image cells attend to each other from the first layer.

  text_tokens [B, L, D], text_mask [B, L], image_tokens [B, M, Dv] -> fused caption positions
  [B, L, D] (the image positions are dropped after the last layer, so [CLS] / mean pooling read
  the same places as in BertFusion). The image tokens enter through a new Dense (Dv -> D), a
  learnt image-type vector and a LayerNorm (`image_proj`, `image_type`, `image_ln`: the text
  tokens are post-LN outputs, so both streams start at the same scale). Params layer_<i>/
  {attention, attention_ln, intermediate, output, output_ln} are the CHECKPOINT_SUBLAYERS.
  """
  num_layers: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32
  remat: str = "none"   # config.model.remat: each layer (models/layers.remat_block)

  @nn.compact
  def __call__(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
               deterministic: bool = True) -> jax.Array:
    del deterministic
    width, length = text_tokens.shape[-1], text_tokens.shape[1]
    image = nn.Dense(width, dtype=self.dtype, name="image_proj")(image_tokens)
    image = image + self.param("image_type", nn.initializers.zeros, (width,)).astype(image.dtype)
    image = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="image_ln")(image)
    x = jnp.concatenate([text_tokens, image.astype(text_tokens.dtype)], axis=1)
    mask = jnp.concatenate([text_mask, jnp.ones(image.shape[:2], text_mask.dtype)], axis=1)
    layer = remat_block(BertLayer, self.remat)
    for i in range(self.num_layers):
      x = layer(self.num_heads, self.intermediate_size, self.layer_norm_eps, self.hidden_act,
                dtype=self.dtype, name=f"layer_{i}")(x, mask)
    return x[:, :length]


def cls_pool(tokens: jax.Array) -> jax.Array:
  """tokens [B, L, D] -> [B, D]: the [CLS] (first) token."""
  return tokens[:, 0]


def mean_pool(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """tokens [B, L, D], mask [B, L] -> [B, D]: mean over real tokens (sentence-transformers)."""
  weights = mask.astype(tokens.dtype)[..., None]
  return (tokens * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
