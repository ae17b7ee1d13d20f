"""`manifest.json` of an export: what a phone app (or `jaxdistill.search`) needs to call the
models correctly, and what made them.

  files            {name: {sha256, bytes}} of every exported file
  image_encoder    file, signature, inputs [{name, shape [B, ...], dtype}], output [B, E],
                   l2_normalized, normalization {scale, mean, std}: x = (pixel/scale - mean)/std
  text_encoder     file, signature, inputs (ids, mask), output, l2_normalized, tokenizer,
                   max_len, encoding (how ids and mask are laid out)
  quantization, source (recipe, workdir, step), config, versions, parity
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
from typing import Sequence

from jaxdistill.export.tflite import OUTPUT, SIGNATURE, InputSpec
from jaxdistill.search import sha256

PACKAGES = ("jaxdistill", "jax", "jaxlib", "flax", "tensorflow-cpu", "ai-edge-litert",
            "tokenizers", "numpy")
TEXT_ENCODING = ("tokenizer.json (WordPiece, lowercasing) -> [CLS] tokens [SEP], cut to max_len "
                 "keeping [SEP] last, then [PAD]=0; mask 1 on real tokens, 0 on padding")


def versions() -> dict[str, str]:
  """Installed versions of the packages that made the export."""
  found = {}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = "not installed"
  return found


def files(directory: str, names: Sequence[str]) -> dict[str, dict]:
  return {name: {"sha256": sha256(os.path.join(directory, name)),
                 "bytes": os.path.getsize(os.path.join(directory, name))} for name in names}


def tower(file: str, inputs: Sequence[InputSpec], batch_size: int, embed_dim: int,
          **extra) -> dict:
  """One model's entry: file, signature, inputs and output (static batch `batch_size`)."""
  b = batch_size
  return {"file": file, "signature": SIGNATURE,
          "inputs": [{"name": s.name, "shape": [b, *s.shape], "dtype": s.dtype} for s in inputs],
          "output": {"name": OUTPUT, "shape": [b, embed_dim], "dtype": "float32"},
          "l2_normalized": True, **extra}


def build(*, image: dict, text: dict, file_table: dict, quantization: str, source: dict,
          config: dict, parity: dict | None = None) -> dict:
  return {"format_version": 1,
          "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "quantization": quantization, "image_encoder": image, "text_encoder": text,
          "files": file_table, "source": source, "versions": versions(), "config": config,
          "parity": parity}
