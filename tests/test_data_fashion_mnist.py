"""Fashion-MNIST loading: the real Debian files, plain and gzipped IDX, and the error messages."""

import gzip
import os

import numpy as np
import pytest

from jaxdistill.data import fashion_mnist as fm

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="module")
def real():
  return fm.load_fashion_mnist()


def _idx_bytes(array: np.ndarray) -> bytes:
  """Independent IDX encoder: magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_dataset(directory, gz: bool, n_train=5, n_test=3, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}
  for stem, array in arrays.items():
    data = _idx_bytes(array)
    if gz:
      (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
    else:
      (directory / stem).write_bytes(data)
  return arrays


def test_real_files_decode_to_the_published_shapes_and_class_counts(real):
  assert real.train_images.shape == (60000, 28, 28) and real.train_images.dtype == np.uint8
  assert real.test_images.shape == (10000, 28, 28) and real.test_labels.shape == (10000,)
  np.testing.assert_array_equal(np.bincount(real.train_labels), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(real.test_labels), np.full(10, 1000))
  # Pixel mean of the 0..1 training images, as published for Fashion-MNIST.
  assert abs(real.train_images.mean() / 255 - 0.2860) < 1e-3


def test_real_files_match_an_independent_decode(real):
  raw = gzip.decompress(open(os.path.join(fm.DEFAULT_DIRS[0], "t10k-images-idx3-ubyte.gz"),
                             "rb").read())
  first = np.frombuffer(raw[16:16 + 2 * 784], np.uint8).reshape(2, 28, 28)
  np.testing.assert_array_equal(real.test_images[:2], first)


@pytest.mark.parametrize("gz", [False, True])
def test_loads_plain_and_gzipped_directories(tmp_path, gz):
  arrays = _write_dataset(tmp_path, gz)
  data = fm.load_fashion_mnist(str(tmp_path))
  np.testing.assert_array_equal(data.train_images, arrays["train-images-idx3-ubyte"])
  np.testing.assert_array_equal(data.train_labels, arrays["train-labels-idx1-ubyte"])
  np.testing.assert_array_equal(data.test_images, arrays["t10k-images-idx3-ubyte"])
  np.testing.assert_array_equal(data.test_labels, arrays["t10k-labels-idx1-ubyte"])


def test_missing_directory_names_the_path_and_the_fix(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(fm.DataNotFoundError) as info:
    fm.load_fashion_mnist(missing)
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert missing in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert "--config.data.fashion_mnist_dir" in message
  assert "train-images-idx3-ubyte[.gz]" in message


def test_one_missing_file_fails_validation_without_decoding(tmp_path):
  _write_dataset(tmp_path, gz=True)
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")  # corrupt, but present
  assert set(fm.validate_fashion_mnist_dir(str(tmp_path))) == {
      "train_images", "train_labels", "test_images", "test_labels"}
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(fm.DataNotFoundError, match=str(tmp_path)):
    fm.validate_fashion_mnist_dir(str(tmp_path))


def test_default_search_finds_the_debian_directory():
  paths = fm.validate_fashion_mnist_dir()
  assert paths["train_images"] == os.path.join(fm.DEFAULT_DIRS[0], "train-images-idx3-ubyte.gz")


def test_bad_magic_names_the_file(tmp_path):
  _write_dataset(tmp_path, gz=False)
  path = tmp_path / "train-labels-idx1-ubyte"
  data = bytearray(path.read_bytes())
  data[3] = 3  # claims 3 dimensions
  path.write_bytes(bytes(data))
  with pytest.raises(fm.DataCorruptError, match="train-labels-idx1-ubyte.*magic"):
    fm.load_fashion_mnist(str(tmp_path))


def test_truncated_data_names_the_file(tmp_path):
  _write_dataset(tmp_path, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(fm.DataCorruptError, match="t10k-images-idx3-ubyte.*truncated"):
    fm.load_fashion_mnist(str(tmp_path))


def test_truncated_gzip_names_the_file(tmp_path):
  _write_dataset(tmp_path, gz=True)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:50])
  with pytest.raises(fm.DataCorruptError, match="train-images-idx3-ubyte.gz") as info:
    fm.load_fashion_mnist(str(tmp_path))
  assert isinstance(info.value, ValueError)


def test_image_and_label_counts_must_agree(tmp_path):
  _write_dataset(tmp_path, gz=False)
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
  with pytest.raises(fm.DataCorruptError, match="train-labels-idx1-ubyte"):
    fm.load_fashion_mnist(str(tmp_path))


def test_class_words():
  assert len(fm.CLASS_NAMES) == len(fm.CLASS_PLURALS) == fm.NUM_CLASSES
  assert fm.CLASS_NAMES[1] == "pair of trousers" and fm.CLASS_PLURALS[1] == "pairs of trousers"
  assert fm.CLASS_NAMES[9] == "ankle boot" and fm.CLASS_PLURALS[3] == "dresses"
  assert len(set(fm.CLASS_NAMES) | set(fm.CLASS_PLURALS)) == 2 * fm.NUM_CLASSES
