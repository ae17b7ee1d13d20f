"""ViT, BEiT and data2vec-vision image encoders (and the pre-LN transformer CLIP shares), in the
layouts of Hugging Face's ViTModel, BeitModel and Data2VecVisionModel.

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

Images are NHWC float32 [B, H, W, C] (HF takes NCHW); H, W must equal the config's image_size
(the positions are not interpolated). Attention: softmax(q k^T / sqrt(d) + bias) v, with a
boolean mask (False = never attended to).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models.bert import activation
from jaxdistill.pretrained.checkpoint import (CheckpointError, map_state_dict, read_state_dict,
                                              select_layers)

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
      raise CheckpointError(f"hidden size {width} is not divisible by num_attention_heads="
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

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if self.relative_positions not in RELATIVE_POSITIONS:
      raise CheckpointError(f"relative_positions={self.relative_positions!r} is unknown: use "
                            f"one of {', '.join(RELATIVE_POSITIONS)}")
    shared = None
    if self.relative_positions == "shared":
      shared = RelativePositionBias(self.window, self.num_heads, name="relative_position_bias")()
    per_layer = self.window if self.relative_positions == "per_layer" else None
    for i in range(self.num_layers):
      x = PreNormBlock(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
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

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank(images, 4)
    batch, height, width, _ = images.shape
    if (height, width) != (self.image_size, self.image_size):
      raise ValueError(f"image size {height}x{width} differs from the model's image_size="
                            f"{self.image_size}: resize the images to {self.image_size}x"
                            f"{self.image_size} (NHWC)")
    if self.pool not in POOLS:
      raise CheckpointError(f"pool={self.pool!r} is unknown: use one of {', '.join(POOLS)}")
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
                       self.relative_positions, grid, self.dtype, name="encoder")(x)
    if self.final_norm:
      x = norm(name="final_norm")(x)
    pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(axis=1)
    if self.pool_norm:
      pooled = norm(name="pool_norm")(pooled)
    if self.pooler is not None:
      pooled = nn.Dense(self.pooler_size or d, dtype=self.dtype, name="pooler")(pooled)
      pooled = activation(self.pooler)(pooled)
    return x, pooled


# Torch key -> Flax path rules shared by ViT / BEiT / data2vec-vision (applied in order; the
# model prefix of the *For* heads (vit., beit., data2vec_vision.) is stripped first).
_PREFIX = r"^(vit|beit|data2vec_vision)\."
_RULES = (
    (_PREFIX, ""),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embedding/"),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "position_embedding"),
    (r"^encoder\.layer\.(\d+)\.", r"encoder/layer_\1/"),
    (r"^encoder\.relative_position_bias\.", "encoder/relative_position_bias/"),
    (r"/attention\.attention\.relative_position_bias\.", "/relative_position_bias/"),
    (r"/attention\.attention\.(query|key|value)\.", r"/attention/\1/"),
    (r"/attention\.output\.dense\.", "/attention/out/"),
    (r"/layernorm_before\.", "/ln_attn/"),
    (r"/layernorm_after\.", "/ln_mlp/"),
    (r"/intermediate\.dense\.", "/fc1/"),
    (r"/output\.dense\.", "/fc2/"),
    (r"^layernorm\.", "final_norm/"),
    (r"^pooler\.layernorm\.", "pool_norm/"),
    (r"^pooler\.dense\.", "pooler/"),
)
# Buffers, mask tokens and task heads that an image encoder does not use.
_IGNORE = (r"relative_position_index$", r"mask_token$",
           r"^(classifier|lm_head|decoder|decode_head|auxiliary_head|fpn\d)\.")
LAYER_PATTERN = r"encoder\.layer\.(\d+)\."


def image_encoder_from_config(config: dict[str, Any], state_dict: dict[str, np.ndarray],
                              dtype: Any = jnp.float32) -> ImageEncoder:
  """HF ViT / BEiT / data2vec-vision config.json dict -> ImageEncoder.

  Whether there is a pooler is read from the checkpoint's keys, as the HF class decides it
  (add_pooling_layer: ViTModel, BeitModel yes; Data2VecVisionModel, ViTForImageClassification
  no). Without one, a use_mean_pooling model pools the plain mean of its patch tokens.
  """
  model_type = config.get("model_type")
  if model_type not in ("vit", "beit", "data2vec-vision"):
    raise CheckpointError(f"model_type {model_type!r} is not a ViT / BEiT / data2vec-vision "
                          "config: pass a checkpoint of one of those")
  image_size, patch_size = config.get("image_size", 224), config.get("patch_size", 16)
  for name, value in (("image_size", image_size), ("patch_size", patch_size)):
    if not isinstance(value, int):
      raise CheckpointError(f"config {name}={value!r}: only square sizes (one int) are supported")
  if image_size % patch_size:
    raise CheckpointError(f"config image_size={image_size} is not divisible by patch_size="
                          f"{patch_size}: fix the config")
  has_pooler = any(re.sub(_PREFIX, "", k).startswith("pooler.") for k in state_dict)
  common = dict(
      image_size=image_size, patch_size=patch_size, hidden_size=config.get("hidden_size", 768),
      num_layers=config.get("num_hidden_layers", 12),
      num_heads=config.get("num_attention_heads", 12),
      mlp_dim=config.get("intermediate_size", 3072),
      activation=config.get("hidden_act", "gelu"),
      layer_norm_eps=config.get("layer_norm_eps", 1e-12), dtype=dtype)
  if model_type == "vit":
    qkv = config.get("qkv_bias", True)
    return ImageEncoder(**common, qkv_bias=(qkv, qkv, qkv),
                        pooler=config.get("pooler_act", "tanh") if has_pooler else None,
                        pooler_size=config.get("pooler_output_size"))
  mean_pooling = config.get("use_mean_pooling", True)
  if config.get("use_shared_relative_position_bias", False):
    relative = "shared"
  elif config.get("use_relative_position_bias", False):
    relative = "per_layer"
  else:
    relative = "none"
  return ImageEncoder(
      **common, qkv_bias=(True, False, True),
      layer_scale_init=config.get("layer_scale_init_value", 0.1),
      absolute_positions=config.get("use_absolute_position_embeddings", False),
      relative_positions=relative, final_norm=not mean_pooling,
      pool="mean" if mean_pooling else "cls", pool_norm=mean_pooling and has_pooler)


def load(path: str, config: dict[str, Any] | None, layers: str | None = None,
         dtype: Any = jnp.float32) -> tuple[ImageEncoder, dict[str, Any]]:
  """ViT / BEiT / data2vec-vision checkpoint (HF dir or file + config) -> (ImageEncoder,
  params). layers: None (all) | "first:N" | "last:N" | "i,j,k" transformer layers, renumbered
  0..n-1 (checkpoint.layer_indices; papers 000, 004); dtype is the compute dtype (params stay
  float32)."""
  if config is None:
    raise CheckpointError(f"{path} has no config.json: ViT / BEiT / data2vec-vision need the "
                          "Hugging Face config; save the model with save_pretrained()")
  state_dict = read_state_dict(path)
  if layers is not None:
    state_dict, kept = select_layers(state_dict, LAYER_PATTERN, layers)
    config = {**config, "num_hidden_layers": len(kept)}
  module = image_encoder_from_config(config, state_dict, dtype)
  size = module.image_size
  expected = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, size, size, config.get("num_channels", 3))))["params"]
  return module, map_state_dict(state_dict, _RULES, expected, ignore=_IGNORE)
