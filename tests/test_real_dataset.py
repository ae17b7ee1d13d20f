"""data/real/dataset.py `RealData`, the trainer's view of real data, on the fixtures of
tests/real_data_fixtures.py: webdataset shards (train stream + an in-memory eval split), tfds
mock data, a Karpathy JSON (tokenizer built from the train captions and kept in the workdir,
unreadable images left as zeros and listed), and its user errors."""

import os

import numpy as np
import pytest

from conftest import recipe_config
from jaxdistill.data.datasets import prepare_data
from jaxdistill.data.eval_split import captions_matrix, image_failures
from jaxdistill.data.real.dataset import RealData
from jaxdistill.data.real.records import DataError
from jaxdistill.pretrained.packaged import minilm_dir
from tests.real_data_fixtures import (CORRUPT, EMPTY_CAPTION, KARPATHY_SPLITS, MISSING,
                                      SIX_CAPTIONS, WDS_CORRUPT, WDS_NO_IMAGE, write_karpathy,
                                      write_webdataset)


def _config(name: str, **data):
  config = recipe_config("dual")
  config.data.name = name
  config.data.image_size = config.data.image_resize = 24
  config.data.num_threads = 1
  config.batch_size = 4
  for key, value in data.items():
    config.data[key] = value
  return config


def test_karpathy_json_train_stream_eval_split_and_tokenizer(tmp_path):
  json_path, image_root = write_karpathy(tmp_path)
  config = _config("coco", karpathy_json=str(json_path), image_root=str(image_root))
  workdir = tmp_path / "run"
  workdir.mkdir()
  data = prepare_data(config, str(workdir))
  assert isinstance(data, RealData) and data.train_split == "train+restval"
  assert (workdir / "tokenizer.json").exists() and data.vocab_size <= config.data.vocab_size
  assert data.num_train("train") == KARPATHY_SPLITS.count("train") + KARPATHY_SPLITS.count("restval")
  it = iter(data.train_dataset(config, "train", process_index=0, process_count=1))
  batch = next(it)
  assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
  assert set(batch) >= {"text_ids", "text_mask", "image_id", "caption_index", "stats"}
  test = data.eval_split("test")
  assert test.dataset == "coco_test" and test.num_images == 2 and test.folds == {}
  assert len(test.text_ids) == 10 and test.images.shape == (2, 24, 24, 3)
  train = data.eval_split("train")       # the cache's view: bad images come back as zeros
  pixels = train.images[:]
  assert image_failures(train.images) == {CORRUPT: "corrupt", MISSING: "missing"}
  assert not pixels[CORRUPT].any() and pixels[0].any()
  assert train.skipped == {"empty_caption": 1}      # image 4's blank caption
  assert len(train.captions[SIX_CAPTIONS]) == 5     # data.max_captions: the 5-caption protocol
  ids, mask = captions_matrix(train, 6)             # the cache's [N, C, L] layout
  assert mask[0, 4].any() and not mask[0, 5].any()
  assert not mask[EMPTY_CAPTION, 1].any() and mask[EMPTY_CAPTION, 2].any()
  np.testing.assert_array_equal(ids[0, 0], train.text_ids[0])
  again = prepare_data(config, str(workdir))        # the workdir's tokenizer, not a new one
  assert again.tokenizer.to_str() == data.tokenizer.to_str()
  texts, t_ids, _ = data.train_sample(3)
  assert len(texts) == 3 and t_ids.shape == (3, config.model.max_len)


def test_fill_model_inputs_from_a_preprocessor(tmp_path):
  import json
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "size": {"height": 48,
       "width": 48}}))
  json_path, image_root = write_karpathy(tmp_path / "k")
  config = _config("karpathy_json", karpathy_json=str(json_path), image_root=str(image_root),
                   preprocessor=str(tmp_path))
  data = RealData(config, None)
  with config.unlocked():
    data.fill_model_inputs(config)
  m = config.model
  assert (m.image_size, m.channels, m.image_mean, m.image_std) == (48, 3, (0.5,) * 3, (0.25,) * 3)
  assert m.vocab_size == data.vocab_size


def test_webdataset_train_stream_and_eval_split(tmp_path):
  shards = write_webdataset(tmp_path)
  pattern = str(tmp_path / "shards-{000000..000001}.tar")
  config = _config("webdataset", tokenizer=minilm_dir())
  config.data.shards.train, config.data.shards.test = pattern, str(shards[1])
  data = RealData(config, None)
  assert data.num_train("train") == 10 and data.dataset == "webdataset"
  batch = next(iter(data.train_dataset(config, "train", process_index=0, process_count=1)))
  assert batch["image"].shape == (4, 24, 24, 3)
  first_shard_keys = {int(WDS_CORRUPT), int(WDS_NO_IMAGE)}
  assert not first_shard_keys & set(batch["image_id"].tolist())
  test = data.eval_split("test")
  assert test.num_images == 5 and len(test.text_ids) >= 4     # one empty caption in shard 1
  texts, _, _ = data.train_sample(2)
  assert len(texts) == 2
  config.data.shards.val = ""
  with pytest.raises(DataError, match="shards.val"):
    data.eval_split("val")


def test_tfds_eval_split_and_stream(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _config("tfds", tokenizer=minilm_dir(), tfds_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=6):
    data = RealData(config, None)
    test = data.eval_split("test")
    batch = next(iter(data.train_dataset(config, "train", process_index=0, process_count=1)))
    pixels = test.images[:3]
  assert data.train_split == "train+restval" and test.num_images == 6
  assert pixels.shape == (3, 24, 24, 3) and batch["text_ids"].shape[0] == 4


def test_user_errors(tmp_path):
  with pytest.raises(DataError, match="needs --config.data.tokenizer"):
    RealData(_config("webdataset"), None)
  json_path, image_root = write_karpathy(tmp_path)
  with pytest.raises(DataError, match="dataset_flickr30k.json"):
    RealData(_config("flickr30k", karpathy_json=str(json_path), image_root=str(image_root)), None)
  with pytest.raises(DataError, match="does not exist"):
    RealData(_config("coco", karpathy_json=str(tmp_path / "none.json"),
                     image_root=str(image_root)), None)
  config = _config("coco", karpathy_json=str(json_path), image_root=str(image_root))
  data = RealData(config, None)
  config.dual.hard_negatives = 4
  with pytest.raises(DataError, match="bundled benchmark only"):
    data.train_dataset(config, "train", process_index=0, process_count=1)
  assert not os.path.exists(tmp_path / "tokenizer.json")   # workdir None: nothing written


def test_unpaired_images_and_texts_zipped_with_state(tmp_path):
  """train_split=unpaired: a folder of images and a text file read apart, one batch of each
  zipped; the zipped iterator's state restores both streams."""
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(6):
    Image.new("RGB", (30 + i, 28), (40 * i, 10, 200)).save(folder / f"{i}.jpg")
  (folder / "broken.jpg").write_bytes(b"nope")
  texts = tmp_path / "captions.txt"
  texts.write_text("\n".join([f"caption number {i}" for i in range(9)] + [""]))
  json_path, image_root = write_karpathy(tmp_path / "k")
  config = _config("coco", karpathy_json=str(json_path), image_root=str(image_root),
                   unpaired_images=str(folder), unpaired_texts=str(texts), train_split="unpaired")
  data = RealData(config, None)
  assert data.num_train("unpaired") == 7
  it = iter(data.train_dataset(config, "unpaired", process_index=0, process_count=1))
  first = next(it)
  state = it.get_state()
  assert set(state) == {"image", "text"}
  second, third = next(it), next(it)
  assert first["image"].shape == (4, 24, 24, 3) and first["text_ids"].shape[0] == 4
  assert sum(s["stats"]["corrupt"] for s in (first, second, third)) >= 1
  it.set_state(state)
  again = next(it)
  for key in ("image", "text_ids", "image_id", "caption_index"):
    np.testing.assert_array_equal(again[key], second[key])
  config.data.unpaired_texts = ""
  with pytest.raises(DataError, match="unpaired_texts"):
    data.train_dataset(config, "unpaired", process_index=0, process_count=1)


def test_config_validation_knows_every_dataset():
  """config.validate's list of data.name values is the one prepare_data dispatches on."""
  from jaxdistill.config import DATA_NAMES
  from jaxdistill.data.datasets import NAMES
  assert DATA_NAMES == NAMES
