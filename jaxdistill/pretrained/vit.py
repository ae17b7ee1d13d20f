"""ViT, BEiT and data2vec-vision checkpoints (Hugging Face ViTModel, BeitModel,
Data2VecVisionModel layouts, their *For* heads' encoders) -> models/hf_vit.ImageEncoder and its
params: the config.json options that pick the encoder's variant (`image_encoder_from_config`),
the torch-key mapping and layer selection (`load`), and the checkpoint's pixel normalisation
(`image_normalization`, from preprocessor_config.json).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models.hf_vit import ImageEncoder
from jaxdistill.pretrained.checkpoint import (CheckpointError, map_state_dict, read_state_dict,
                                              select_layers)

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
# transformers' ViTImageProcessor / BeitImageProcessor defaults (IMAGENET_STANDARD_MEAN / _STD).
DEFAULT_IMAGE_MEAN = DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def image_normalization(path: str, channels: int = 3
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The checkpoint's input normalisation for pixels in [0, 1]: per-channel (mean, std) of
  length `channels`, from its preprocessor_config.json (image_mean / image_std, scaled when
  its pixels are not raw / 255; do_normalize false: 0 / 1), else the HF image processors'
  defaults (0.5 each)."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  file = os.path.join(directory, PREPROCESSOR_CONFIG)
  mean, std, scale = DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, 1.0
  if os.path.isfile(file):
    with open(file) as f:
      pre = json.load(f)
    if not pre.get("do_normalize", True):
      mean, std = 0.0, 1.0
    else:
      mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    # HF normalises raw 0..255 pixels times rescale_factor (do_rescale; 1/255 by default)
    scale = 255.0 * (pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0)
  out = []
  for name, value in (("image_mean", mean), ("image_std", std)):
    value = [float(value)] * channels if np.ndim(value) == 0 else [float(v) for v in value]
    if len(value) != channels:
      raise CheckpointError(f"{file}: {name} has {len(value)} values for num_channels="
                            f"{channels}: give one per channel")
    out.append(tuple(v / scale for v in value))
  return out[0], out[1]


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
