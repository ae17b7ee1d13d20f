"""The phone app's pipeline on a laptop, from the exported files alone (papers 000 / 001):
index a folder of images with `image_encoder.tflite`, save the index, and answer a text query
with `tokenizer.json` + `text_encoder.tflite` + the index (exact dot-product top-k).

  python -m jaxdistill.search index --export_dir=runs/loopitr/export --images=DIR \
      --index=runs/loopitr/index.npz
  python -m jaxdistill.search query --export_dir=runs/loopitr/export \
      --index=runs/loopitr/index.npz --k=10 "a bag to the left of a sneaker"

Imports numpy, ai_edge_litert, tokenizers, PIL and the standard library only — no JAX, no
TensorFlow (`jaxdistill.data.tokenizer` is numpy + tokenizers): what a phone has.
Images: any file PIL reads, converted to the model's channels ("L" or "RGB"), resized to the
model's size, normalised as the manifest says; unreadable files are skipped and counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import zipfile

import numpy as np
import tokenizers

from jaxdistill.atomic import atomic_open
from jaxdistill.data.tokenizer import encode
from jaxdistill.errors import JaxDistillError

MANIFEST = "manifest.json"
SIGNATURE = "serving_default"
OUTPUT = "embedding"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class SearchError(JaxDistillError, ValueError):
  """Bad exported files, images or index; the message names the thing and the fix."""


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class Tower:
  """One exported encoder: named inputs [N, ...] -> embeddings float32 [N, E], run by LiteRT
  in chunks of the model's static batch size B (the last chunk padded with its last row)."""

  def __init__(self, path: str, num_threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter
    try:
      self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
      self.runner = self.interpreter.get_signature_runner(SIGNATURE)
    except ValueError as e:
      raise SearchError(f"{path} is not a TFLite model with a {SIGNATURE!r} signature ({e}): "
                        "re-export") from e
    self.batch_size = int(next(iter(self.runner.get_input_details().values()))["shape"][0])

  def __call__(self, **inputs: np.ndarray) -> np.ndarray:
    n, b = len(next(iter(inputs.values()))), self.batch_size
    out = []
    for start in range(0, n, b):
      chunk = {k: v[start:start + b] for k, v in inputs.items()}
      pad = b - len(next(iter(chunk.values())))
      if pad:
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()}
      out.append(self.runner(**chunk)[OUTPUT][:b - pad])
    return np.concatenate(out)


@dataclasses.dataclass
class Exported:
  """An export directory, loaded: manifest, both towers and the tokenizer."""
  directory: str
  manifest: dict
  image: Tower
  text: Tower
  tokenizer: tokenizers.Tokenizer

  def embed_texts(self, texts: list[str]) -> np.ndarray:
    """Queries -> float32 [N, E] (L2-normalised by the model)."""
    ids, mask = encode(self.tokenizer, texts, self.manifest["text_encoder"]["max_len"])
    return self.text(ids=ids, mask=mask)

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, C] at the model's size -> float32 [N, E]."""
    spec = self.manifest["image_encoder"]
    norm = spec["normalization"]
    x = images.astype(np.float32).reshape(len(images), *spec["inputs"][0]["shape"][1:])
    x = (x / np.float32(norm["scale"]) - np.float32(norm["mean"])) / np.float32(norm["std"])
    return self.image(**{spec["inputs"][0]["name"]: x})


def load_export(export_dir: str, num_threads: int | None = None) -> Exported:
  """Reads `export_dir` (written by --mode=export); checks every file against its checksum."""
  path = os.path.join(export_dir, MANIFEST)
  if not os.path.isfile(path):
    raise SearchError(f"{path} does not exist: point --export_dir at the export/ directory that "
                      "`python -m jaxdistill.main --mode=export --workdir=RUN` writes")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except ValueError as e:
    raise SearchError(f"{path} is not valid JSON ({e}): re-export") from e
  _check_manifest(manifest, path)
  for name, want in manifest["files"].items():
    file = os.path.join(export_dir, name)
    if not os.path.isfile(file) or sha256(file) != want["sha256"]:
      raise SearchError(f"{file} is missing or differs from its checksum in {path}: re-export")
  return Exported(
      directory=export_dir, manifest=manifest,
      image=Tower(os.path.join(export_dir, manifest["image_encoder"]["file"]), num_threads),
      text=Tower(os.path.join(export_dir, manifest["text_encoder"]["file"]), num_threads),
      tokenizer=tokenizers.Tokenizer.from_file(
          os.path.join(export_dir, manifest["text_encoder"]["tokenizer"])))


# What this module reads from manifest.json (keys, and list positions as ints).
MANIFEST_KEYS = (
    ("image_encoder", "file"), ("image_encoder", "inputs", 0, "name"),
    ("image_encoder", "inputs", 0, "shape"), ("image_encoder", "normalization", "scale"),
    ("image_encoder", "normalization", "mean"), ("image_encoder", "normalization", "std"),
    ("text_encoder", "file"), ("text_encoder", "tokenizer"), ("text_encoder", "max_len"),
    ("files",))


def _check_manifest(manifest, path: str) -> None:
  """Every key in MANIFEST_KEYS, and a sha256 for each file listed and each file the towers use."""
  def lookup(key: tuple) -> object:
    node = manifest
    try:
      for part in key:
        node = node[part]
    except (KeyError, IndexError, TypeError) as e:
      shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in key)[1:]
      raise SearchError(f"{path} has no {shown}: it is not a complete export manifest; re-export "
                        "(python -m jaxdistill.main --mode=export --workdir=RUN)") from e
    return node

  for key in MANIFEST_KEYS:
    lookup(key)
  image, text = manifest["image_encoder"], manifest["text_encoder"]
  for name in (image["file"], text["file"], text["tokenizer"], *manifest["files"]):
    lookup(("files", name, "sha256"))


def read_image(path: str, shape: tuple[int, int, int]) -> np.ndarray:
  """An image file -> uint8 [H, W, C] in the model's size and channels (C 1: grey, 3: RGB)."""
  from PIL import Image
  height, width, channels = shape
  with Image.open(path) as image:
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
      image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, np.uint8).reshape(height, width, channels)


@dataclasses.dataclass
class Index:
  """embeddings float32 [N, E] (unit norm) of the images at `paths` [N]; image_model: the
  sha256 of the image model that made them (a query model from another export is refused)."""
  embeddings: np.ndarray
  paths: list[str]
  image_model: str
  skipped: int = 0


def index_folder(exported: Exported, image_dir: str, batch_size: int = 64) -> Index:
  """Embeds every image file under `image_dir` (sorted, recursive); skips unreadable ones."""
  if not os.path.isdir(image_dir):
    raise SearchError(f"--images={image_dir!r} is not a directory: point it at a folder of images")
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(image_dir)
                 for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
  shape = tuple(exported.manifest["image_encoder"]["inputs"][0]["shape"][1:])
  paths, chunks, pending, skipped = [], [], [], 0
  for i, file in enumerate(files):
    try:
      pending.append(read_image(file, shape))
      paths.append(os.path.relpath(file, image_dir))
    except (OSError, ValueError):
      skipped += 1
    if pending and (len(pending) == batch_size or i == len(files) - 1):
      chunks.append(exported.embed_images(np.stack(pending)))
      pending = []
  if not paths:
    raise SearchError(f"no readable image in {image_dir} ({len(files)} image files, {skipped} "
                      f"unreadable; extensions {', '.join(IMAGE_EXTENSIONS)})")
  return Index(np.concatenate(chunks), paths, exported.manifest["files"][
      exported.manifest["image_encoder"]["file"]]["sha256"], skipped)


def save_index(index: Index, path: str) -> None:
  """Writes the index as .npz via a temporary file and a rename (never half-written)."""
  with atomic_open(path, "wb") as f:
    np.savez(f, embeddings=index.embeddings, paths=np.asarray(index.paths),
             image_model=np.asarray(index.image_model))


def load_index(path: str, exported: Exported) -> Index:
  """Reads an index written by save_index; it must come from `exported`'s image model."""
  if not os.path.isfile(path):
    raise SearchError(f"index {path} does not exist: build it with `python -m jaxdistill.search "
                      "index --images=DIR --index=PATH`")
  try:
    with np.load(path) as data:
      index = Index(data["embeddings"], data["paths"].tolist(), str(data["image_model"]))
  except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
    raise SearchError(f"index {path} is not a readable index ({type(e).__name__}: {e}): rebuild "
                      "it with `python -m jaxdistill.search index --images=DIR --index=PATH`") from e
  want = exported.manifest["files"][exported.manifest["image_encoder"]["file"]]["sha256"]
  if index.image_model != want:
    raise SearchError(f"index {path} was built with another image model than "
                      f"{exported.directory}: rebuild it with this export")
  return index


def top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact maximum inner product: [N, E], [Q, E] -> (indices int [Q, k], scores [Q, k]),
  best first (argpartition, then a sort of the k)."""
  k = min(k, len(embeddings))
  scores = queries @ embeddings.T
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  part_scores = np.take_along_axis(scores, part, axis=1)
  order = np.argsort(-part_scores, axis=1, kind="stable")
  return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


def _check_query_args(queries: list[str], k: int) -> None:
  """The query command's --k and query texts, checked before any model is loaded."""
  if k < 1:
    raise SearchError(f"--k={k} must be at least 1 (results per query, e.g. --k=10)")
  for i, query in enumerate(queries, 1):
    if not query.strip():
      raise SearchError(f"query {i} is empty: give the text to search for, e.g. "
                        "\"a bag to the left of a sneaker\"")


def _main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxdistill.search", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  index_cmd = commands.add_parser("index", help="embed a folder of images into an index file")
  index_cmd.add_argument("--images", required=True, help="folder of images (searched recursively)")
  query_cmd = commands.add_parser("query", help="answer text queries from an index file")
  query_cmd.add_argument("--k", type=int, default=10, help="results per query")
  query_cmd.add_argument("queries", nargs="+", help="one or more text queries")
  for cmd in (index_cmd, query_cmd):
    cmd.add_argument("--export_dir", required=True, help="the export/ directory of a run")
    cmd.add_argument("--index", required=True, help="index file (.npz)")
    cmd.add_argument("--threads", type=int, default=None, help="LiteRT threads (default: all)")
  args = parser.parse_args(argv)
  try:
    if args.command == "query":
      _check_query_args(args.queries, args.k)
    exported = load_export(args.export_dir, args.threads)
    if args.command == "index":
      index = index_folder(exported, args.images)
      save_index(index, args.index)
      print(f"indexed {len(index.paths)} images ({index.skipped} unreadable, skipped) -> "
            f"{args.index}")
    else:
      index = load_index(args.index, exported)
      indices, scores = top_k(index.embeddings, exported.embed_texts(args.queries), args.k)
      for query, rows, row_scores in zip(args.queries, indices, scores):
        results = [{"path": index.paths[i], "score": round(float(s), 4)}
                   for i, s in zip(rows, row_scores)]
        print(json.dumps({"query": query, "results": results}))
  except SearchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
