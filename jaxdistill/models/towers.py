"""Image and text towers chosen by the `model` config (`image_tower`, `text_tower`), all with
the DualEncoder's tower interface (models/dual.py):

  image: (images float32 [B, H, W, C] normalised as the benchmark does, deterministic=True)
         -> tokens [B, 1 + P, D]: token 0 global, then P spatial slots (row-major cells)
  text:  (ids int32 [B, L], mask [B, L], deterministic=True) -> tokens [B, L, D]

- "vit" / "transformer": models/vit.ViT and models/text.TextEncoder, trained from scratch.
- "bert": models/bert.Bert (HF BertModel layout, so MiniLM / BERT checkpoints map onto it,
  pretrained/towers.py); params {"bert": ...}.
- "efficientnet_lite0": models/efficientnet_lite.EfficientNetLite0 with BatchNorm folded into
  its convs; the benchmark image (normalised with model.image_mean / image_std, as
  data/compositional.py does) is turned into the ImageNet input it was trained on and its
  head map average-pooled per cell of model.patch_size pixels (P cells, as the ViT's patches),
  token 0 the mean of the cells; params {"backbone": ...}.
- "hf_vit": models/hf_vit.ImageEncoder, a Hugging Face ViT / BEiT / data2vec-vision encoder
  (pretrained/towers.py maps a checkpoint, or its first N layers, onto it; the model.hf_vit_*
  fields hold its options): the benchmark image is adapted to the checkpoint's input
  (`adapt_images`) and the tokens are its [CLS] + patch tokens; params {"vit": ...}.

The selector fields fall back to "vit" / "transformer" for configs saved before they existed.
Every transformer tower gets model.remat (`remat`: each of its blocks, models/layers.remat_block;
"none" for configs saved before it existed) and the computation dtype it is given.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdistill.models.bert import Bert
from jaxdistill.models.efficientnet_lite import HEAD_WIDTH, STRIDE, EfficientNetLite0, normalize
from jaxdistill.models.hf_vit import ImageEncoder
from jaxdistill.models.text import TextEncoder
from jaxdistill.models.vit import ViT

IMAGE_TOWERS = ("vit", "efficientnet_lite0", "hf_vit")
TEXT_TOWERS = ("transformer", "bert")


class BertTower(nn.Module):
  """ids int32 [B, L], mask [B, L] -> tokens [B, L, D] of `bert` (token type 0 everywhere).
  Bert has no dropout: `deterministic` (and model.dropout_rate) have no effect."""
  bert: Bert

  def __call__(self, ids: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
    del deterministic
    return self.bert(ids, mask)


@functools.lru_cache(maxsize=None)
def resize_matrix(size: int, new_size: int) -> np.ndarray:
  """The [new_size, size] float32 matrix of jax.image.resize's bilinear resize along one axis
  (half-pixel centres), computed at trace time: a constant of the exported graph rather than
  index arithmetic evaluated (and, in a full-integer TFLite model, quantised) at run time."""
  with jax.ensure_compile_time_eval():
    return np.asarray(jax.image.resize(jnp.eye(size, dtype=jnp.float32), (new_size, size),
                                       "bilinear"))


def bilinear_resize(images: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C], bilinear, as two 2-D matmuls with constant matrices
  (FULLY_CONNECTED in TFLite)."""
  batch, height, width, channels = images.shape
  x = images.transpose(0, 3, 1, 2).reshape(-1, width) @ resize_matrix(width, size).T
  x = x.reshape(-1, height, size).transpose(0, 2, 1).reshape(-1, height)
  x = x @ resize_matrix(height, size).T                                  # [B C size(x), size(y)]
  return x.reshape(batch, channels, size, size).transpose(0, 3, 2, 1)


class EfficientNetTower(nn.Module):
  """images [B, H, W, C] (C = 1 or 3, normalised with input_mean / input_std) -> tokens
  [B, 1 + P, 1280], P = (H / cell_size) (W / cell_size).

  Input (as the LiT teacher, Zhai et al. 2022): un-normalise, bilinear-resize to input_size x
  input_size (`bilinear_resize`: jax.image.resize's weights as constants), grey -> RGB,
  ImageNet-normalise. Output: the head map [B, s, s, 1280] (s = input_size / 32) average-pooled
  per cell; token 0 = the mean of the cells. Global average pooling alone would erase where an
  item is, which the benchmark's captions are about. No dropout: `deterministic` has no effect.
  """
  backbone: EfficientNetLite0
  cell_size: int
  input_size: int
  input_mean: float | tuple[float, ...]   # one value, or one per channel (real data's RGB)
  input_std: float | tuple[float, ...]

  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    del deterministic
    batch, height, width, channels = images.shape
    if height % self.cell_size or width % self.cell_size or channels not in (1, 3):
      raise ValueError(f"images [B, {height}, {width}, {channels}]: the EfficientNet-Lite0 tower "
                       f"needs 1 or 3 channels and sides divisible by model.patch_size="
                       f"{self.cell_size} (the cell size)")
    rows, cols = height // self.cell_size, width // self.cell_size
    side = self.input_size // STRIDE
    if self.input_size % STRIDE or side % rows or side % cols:
      raise ValueError(f"--config.model.efficientnet_input_size={self.input_size} must be a "
                       f"multiple of {STRIDE} x {rows} and {STRIDE} x {cols} (EfficientNet's "
                       f"stride x cells per side), e.g. {STRIDE * rows * cols}")
    per_channel = lambda v: jnp.asarray(v, jnp.float32) if isinstance(v, (tuple, list)) else v
    pixels = images * per_channel(self.input_std) + per_channel(self.input_mean)
    pixels = bilinear_resize(pixels, self.input_size)
    x = normalize(jnp.repeat(pixels, 3 // channels, axis=-1))
    fmap = self.backbone.feature_map(x)                     # [B, s, s, 1280]
    cells = fmap.reshape(batch, rows, side // rows, cols, side // cols, -1).mean(axis=(2, 4))
    cells = cells.reshape(batch, rows * cols, -1)
    return jnp.concatenate([cells.mean(axis=1, keepdims=True), cells], axis=1)


def adapt_images(images: jax.Array, input_mean: Any, input_std: Any, size: int, channels: int,
                 mean: Any, std: Any) -> jax.Array:
  """images [B, H, W, C] normalised with (input_mean, input_std) -> [B, size, size, channels]
  normalised with (mean, std): un-normalise, bilinear-resize (`bilinear_resize`, only when H or W
  differs from size), grey -> RGB (C = 1, channels = 3), normalise. Means and stds: a float or
  one per channel (of C for the input, of `channels` for the output)."""
  _, height, width, c = images.shape
  if c != channels and (c, channels) != (1, 3):
    raise ValueError(f"images [B, {height}, {width}, {c}] cannot feed an encoder of {channels} "
                     f"channels: give images of {channels} channels (or grey ones for RGB)")
  as_array = lambda v: jnp.asarray(v, jnp.float32)
  pixels = images.astype(jnp.float32) * as_array(input_std) + as_array(input_mean)
  if (height, width) != (size, size):
    pixels = bilinear_resize(pixels, size)
  pixels = jnp.repeat(pixels, channels // c, axis=-1)
  return (pixels - as_array(mean)) / as_array(std)


class HFViTTower(nn.Module):
  """images [B, H, W, C] (normalised with input_mean / input_std) -> tokens [B, 1 + P, D] of a
  Hugging Face ViT / BEiT / data2vec-vision encoder: [CLS] first, after its final LayerNorm when
  it has one (vit.final_norm); P = (vit.image_size / vit.patch_size)^2.

  Input: `adapt_images` to the encoder's image_size, `channels` and normalisation (mean, std,
  the checkpoint's); images that already are that (its size and channels, input_mean / input_std
  = mean / std) pass through unchanged up to float rounding. No dropout: `deterministic` has no
  effect.
  """
  vit: ImageEncoder
  channels: int
  input_mean: float | tuple[float, ...]
  input_std: float | tuple[float, ...]
  mean: float | tuple[float, ...]
  std: float | tuple[float, ...]

  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    del deterministic
    x = adapt_images(images, self.input_mean, self.input_std, self.vit.image_size, self.channels,
                     self.mean, self.std)
    return self.vit(x)[0]


def remat(mc: ml_collections.ConfigDict) -> str:
  """config.model.remat ("none" | "full" | "dots"; "none" when a saved config lacks it)."""
  return mc.get("remat", "none")


def _floats(value: Any) -> float | tuple[float, ...]:
  """A config's float or per-channel sequence as a hashable module field."""
  return float(value) if np.ndim(value) == 0 else tuple(float(v) for v in value)


def hf_vit_tower(mc: ml_collections.ConfigDict, dtype: Any = jnp.float32) -> HFViTTower:
  """The "hf_vit" tower of the `model` section: vision_width / layers / heads / mlp and the
  hf_vit_* fields (jaxdistill/config.py; pretrained/tower_configs.hf_vit fills them)."""
  vit = ImageEncoder(
      mc.hf_vit_image_size, mc.hf_vit_patch_size, mc.vision_width, mc.vision_layers,
      mc.vision_heads, mc.vision_mlp, activation=mc.hf_vit_activation,
      layer_norm_eps=mc.hf_vit_layer_norm_eps,
      qkv_bias=tuple(bool(b) for b in mc.hf_vit_qkv_bias),
      layer_scale_init=mc.hf_vit_layer_scale, absolute_positions=mc.hf_vit_absolute_positions,
      relative_positions=mc.hf_vit_relative_positions, final_norm=mc.hf_vit_final_norm,
      dtype=dtype, remat=remat(mc))
  return HFViTTower(vit, mc.hf_vit_channels, _floats(mc.image_mean), _floats(mc.image_std),
                    _floats(mc.hf_vit_image_mean), _floats(mc.hf_vit_image_std))


def image_tower(mc: ml_collections.ConfigDict, dtype: Any = jnp.float32) -> nn.Module:
  """The `model` config section -> the image tower (mc.image_tower in IMAGE_TOWERS)."""
  kind = mc.get("image_tower", "vit")
  if kind == "vit":
    return ViT(mc.patch_size, mc.vision_width, mc.vision_layers, mc.vision_heads, mc.vision_mlp,
               stem=mc.stem, dropout_rate=mc.dropout_rate, dtype=dtype, remat=remat(mc))
  if kind == "efficientnet_lite0":
    return EfficientNetTower(EfficientNetLite0(fold_bn=True, dtype=dtype), mc.patch_size,
                             mc.efficientnet_input_size, mc.image_mean, mc.image_std)
  if kind == "hf_vit":
    return hf_vit_tower(mc, dtype)
  raise ValueError(f"--config.model.image_tower={kind!r} is not valid: use one of "
                   f"{', '.join(IMAGE_TOWERS)}")


def image_width(mc: ml_collections.ConfigDict) -> int:
  """Width Dv of the image tower's tokens."""
  return HEAD_WIDTH if mc.get("image_tower", "vit") == "efficientnet_lite0" else mc.vision_width


def text_tower(mc: ml_collections.ConfigDict, dtype: Any = jnp.float32) -> nn.Module:
  """The `model` config section -> the text tower (mc.text_tower in TEXT_TOWERS)."""
  kind = mc.get("text_tower", "transformer")
  if kind == "transformer":
    return TextEncoder(mc.vocab_size, mc.max_len, mc.text_width, mc.text_layers, mc.text_heads,
                       mc.text_mlp, dropout_rate=mc.dropout_rate, dtype=dtype, remat=remat(mc))
  if kind == "bert":
    return BertTower(Bert(
        mc.vocab_size, mc.text_width, mc.text_layers, mc.text_heads, mc.text_mlp,
        mc.bert_max_positions, type_vocab_size=mc.bert_type_vocab_size,
        layer_norm_eps=mc.bert_layer_norm_eps, hidden_act=mc.bert_hidden_act, dtype=dtype,
        remat=remat(mc)))
  raise ValueError(f"--config.model.text_tower={kind!r} is not valid: use one of "
                   f"{', '.join(TEXT_TOWERS)}")
