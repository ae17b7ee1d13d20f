"""`load_pretrained(path)`: a checkpoint on disk -> (Flax module, params, config).

The architecture comes from the argument, else from config.json's `architectures` (in order),
then its `model_type`. Each family registers a loader `(path, config, **kwargs) -> (module,
params)` in LOADERS; config is the parsed config.json, or None where the checkpoint has none
(ALBEF's published .pth files).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from jaxdistill.pretrained import albef, bert, blip, clip, efficientnet_lite, vit
from jaxdistill.pretrained.checkpoint import CheckpointError, read_config

Loader = Callable[..., tuple[Any, Any]]

LOADERS: dict[str, Loader] = {
    "BertModel": bert.load,
    "bert": bert.load,
    "BlipForImageTextRetrieval": blip.load,
    "blip": blip.load,
    "albef": albef.load,
    "CLIPModel": clip.load,
    "clip": clip.load,
    "ViTModel": vit.load,
    "vit": vit.load,
    "BeitModel": vit.load,
    "beit": vit.load,
    "Data2VecVisionModel": vit.load,
    "data2vec-vision": vit.load,
    "efficientnet_lite0": efficientnet_lite.load,
}


def _config_or_none(path: str) -> dict[str, Any] | None:
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  return read_config(path) if os.path.isfile(os.path.join(directory, "config.json")) else None


def load_pretrained(path: str, architecture: str | None = None, **kwargs: Any
                    ) -> tuple[Any, Any, dict[str, Any] | None]:
  """path (HF directory or one file) -> (module, params, config). kwargs go to the family's
  loader (e.g. layers="first:N" keeps the first N transformer layers)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path does not exist: {path}; pass a Hugging Face model "
                          "directory or a .safetensors/.bin/.pth file")
  config = _config_or_none(path)
  if architecture is None:
    if config is None:
      raise CheckpointError(f"{path} has no config.json to tell its architecture: pass "
                            f"architecture= one of {sorted(LOADERS)}")
    names = [*(config.get("architectures") or []), config.get("model_type")]
    architecture = next((n for n in names if n in LOADERS), names[0] if names else None)
  if architecture not in LOADERS:
    raise CheckpointError(f"unknown architecture {architecture!r} for {path}: known are "
                          f"{sorted(LOADERS)}; pass architecture= one of them")
  module, params = LOADERS[architecture](path, config, **kwargs)
  return module, params, config
