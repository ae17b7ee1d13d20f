"""Fashion-MNIST on disk: finding, validating and decoding the four IDX files, and the class
words the compositional benchmark's captions use.

Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 60,000 train and 10,000 test 28x28 grey images of
10 clothing classes, stored as IDX files (big-endian header: magic, dimension sizes; then uint8
data), usually gzipped.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib

import chex
import numpy as np
from jaxdistill.errors import JaxDistillError

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
IMAGE_SIZE = 28
NUM_CLASSES = 10

# Caption words per class id (Fashion-MNIST label order). "trousers" is a plural noun, so a
# single item is "a pair of trousers".
CLASS_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot")
CLASS_PLURALS = ("t-shirts", "pairs of trousers", "pullovers", "dresses", "coats", "sandals",
                 "shirts", "sneakers", "bags", "ankle boots")

_FILES = {  # field -> (file stem, IDX magic number, number of dimensions)
    "train_images": ("train-images-idx3-ubyte", 0x0803, 3),
    "train_labels": ("train-labels-idx1-ubyte", 0x0801, 1),
    "test_images": ("t10k-images-idx3-ubyte", 0x0803, 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 0x0801, 1),
}


class DataNotFoundError(JaxDistillError, FileNotFoundError):
  """The Fashion-MNIST files are not where we looked."""


class DataCorruptError(JaxDistillError, ValueError):
  """A Fashion-MNIST file exists but does not decode as the expected IDX array."""


@dataclasses.dataclass(frozen=True)
class FashionMnist:
  """train_images uint8 [60000, 28, 28], train_labels uint8 [60000],
  test_images uint8 [10000, 28, 28], test_labels uint8 [10000] (labels index CLASS_NAMES)."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def _not_found_message(looked_at: list[str]) -> str:
  names = ", ".join(f"{stem}[.gz]" for stem, _, _ in _FILES.values())
  return (f"Fashion-MNIST not found (looked in: {', '.join(looked_at)}): install Debian's "
          "dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`) or set "
          f"--config.data.fashion_mnist_dir=DIR to a directory holding {names}")


def _find_files(directory: str) -> dict[str, str] | None:
  """Field -> its file in `directory` (plain preferred over .gz); None if any is missing."""
  paths = {}
  for field, (stem, _, _) in _FILES.items():
    candidates = [os.path.join(directory, stem + suffix) for suffix in ("", ".gz")]
    found = [p for p in candidates if os.path.isfile(p)]
    if not found:
      return None
    paths[field] = found[0]
  return paths


def validate_fashion_mnist_dir(data_dir: str | None = None) -> dict[str, str]:
  """Checks (without decoding) that the four IDX files exist; returns field -> path.

  data_dir None searches DEFAULT_DIRS. Raises DataNotFoundError naming the places looked at."""
  directories = [data_dir] if data_dir is not None else list(DEFAULT_DIRS)
  for directory in directories:
    paths = _find_files(directory)
    if paths is not None:
      return paths
  raise DataNotFoundError(_not_found_message(directories))


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
  """Decodes one uint8 IDX file (gzipped if its name ends in .gz)."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut gzip, EOFError
    raise DataCorruptError(f"{path}: cannot be read ({e}); re-download or reinstall the "
                           "Fashion-MNIST files") from e
  header_bytes = 4 + 4 * ndim
  if len(raw) < header_bytes:
    raise DataCorruptError(f"{path}: truncated IDX header ({len(raw)} bytes); re-download or "
                           "reinstall the Fashion-MNIST files")
  found_magic = int.from_bytes(raw[:4], "big")
  if found_magic != magic:
    raise DataCorruptError(f"{path}: bad IDX magic number {found_magic:#010x} (expected "
                           f"{magic:#010x}); is this the right file? Re-download it")
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(shape))
  if len(raw) - header_bytes != expected:
    raise DataCorruptError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
                           f"holds {len(raw) - header_bytes}; the file is truncated or corrupt, "
                           "re-download it")
  return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def load_fashion_mnist(data_dir: str | None = None) -> FashionMnist:
  """Loads the four IDX files from `data_dir` (None: the first of DEFAULT_DIRS that has them).

  Raises DataNotFoundError if missing, DataCorruptError if a file does not decode."""
  paths = validate_fashion_mnist_dir(data_dir)
  arrays = {field: _read_idx(paths[field], magic, ndim)
            for field, (_, magic, ndim) in _FILES.items()}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[0] != labels.shape[0]:
      raise DataCorruptError(
          f"{paths[f'{split}_images']}, {paths[f'{split}_labels']}: images {images.shape} and "
          f"labels {labels.shape} do not form a Fashion-MNIST split of 28x28 images; re-download")
    if labels.size and labels.max() >= NUM_CLASSES:
      raise DataCorruptError(f"{paths[f'{split}_labels']}: label {labels.max()} is not a "
                             f"Fashion-MNIST class (0..{NUM_CLASSES - 1}); re-download it")
  data = FashionMnist(**arrays)
  chex.assert_type([data.train_images, data.train_labels, data.test_images, data.test_labels],
                   np.uint8)
  return data
