"""The Karpathy JSON loader on a fixture the test writes (12 tiny JPEGs, one corrupt, one
missing): split sizes, 5 captions per image, paths and ids, the COCO 1K folds, the user errors,
and the acceptance run through the training pipeline (bad images skipped and counted,
deterministic order for a seed, two simulated hosts reading disjoint items covering an epoch)."""

import json

import numpy as np
import pytest

from jaxdistill.data.real import karpathy, pipeline
from jaxdistill.data.real.image_ops import ImageSpec
from jaxdistill.data.real.records import DataError
from jaxdistill.data.real.text import TextEncoder
from jaxdistill.pretrained.packaged import minilm_dir
from real_data_fixtures import (COCO_ID_BASE, CORRUPT, EMPTY_CAPTION, KARPATHY_SPLITS, MISSING,
                                SIX_CAPTIONS, caption, write_karpathy)

SPEC = ImageSpec(size=32, resize=36)
GOOD_TRAIN = [i for i, s in enumerate(KARPATHY_SPLITS) if s in ("train", "restval")
              and i not in (CORRUPT, MISSING)]


@pytest.fixture
def coco(tmp_path):
  json_path, image_root = write_karpathy(tmp_path)
  return karpathy.load_karpathy(str(json_path), str(image_root)), image_root


@pytest.fixture(scope="module")
def encoder():
  return TextEncoder.from_file(minilm_dir(), max_len=16)


def test_split_sizes_and_names(coco):
  data, _ = coco
  assert data.dataset == "coco"
  assert data.sizes == {"train": 6, "restval": 2, "val": 2, "test": 2}
  assert data.names == ["train", "restval", "val", "test"]
  union = data.split("train+restval")
  assert len(union) == 8 and union.name == "train+restval"
  assert [r.image_id for r in union] == [COCO_ID_BASE + i for i in range(8)]
  assert [r.split for r in data.split("val")] == ["val", "val"]


def test_records_have_paths_ids_and_five_captions(coco, tmp_path):
  data, image_root = coco
  train = data.split("train")
  for i, record in enumerate(train):
    assert record.image_id == COCO_ID_BASE + i
    assert record.key == f"val2014/COCO_val2014_{i:012d}.jpg"
    assert record.image == str(image_root / record.key)
    assert len(record.captions) == 5
    expected = [caption(i, c) for c in range(5)]
    if i == EMPTY_CAPTION:
      expected[1] = ""                    # kept by the loader, skipped by the pipeline
    assert list(record.captions) == expected
  assert train.num_captions == 30
  # image 3 has 6 captions in the JSON: the first 5 are kept, max_captions=None keeps all
  everything = karpathy.load_karpathy(data.json_path, str(image_root), max_captions=None)
  assert len(everything.split("train")[SIX_CAPTIONS].captions) == 6
  assert len(train[SIX_CAPTIONS].captions) == 5
  with pytest.raises(IndexError):
    train[6]


def test_flickr_style_json_uses_imgid_and_no_filepath(tmp_path):
  (tmp_path / "flickr30k-images").mkdir()
  entries = [{"filename": f"{i}.jpg", "imgid": i, "split": s,
              "sentences": [{"tokens": ["a", "dog", str(i)]}] * 5}
             for i, s in enumerate(["train", "train", "val", "test"])]
  (tmp_path / "dataset_flickr30k.json").write_text(
      json.dumps({"dataset": "flickr30k", "images": entries}))
  data = karpathy.load_karpathy(str(tmp_path / "dataset_flickr30k.json"),
                                str(tmp_path / "flickr30k-images"))
  assert data.sizes == {"train": 2, "restval": 0, "val": 1, "test": 1}
  record = data.split("test")[0]
  assert record.image_id == 3 and record.image == str(tmp_path / "flickr30k-images" / "3.jpg")
  assert record.captions == ("a dog 3",) * 5          # tokens joined when there is no "raw"
  with pytest.raises(DataError, match="unknown split 'restval'.*it has train, val, test"):
    data.split("train+restval")                         # Flickr30K has no restval
  with pytest.raises(DataError, match="1K folds are the COCO 5K test split.*has 1 test images"):
    data.split("test1k_0")


def test_coco_1k_folds(tmp_path):
  (tmp_path / "images").mkdir()
  entries = [{"filepath": "val2014", "filename": f"{i}.jpg", "cocoid": 10 * i, "imgid": i,
              "split": "test" if i < 5000 else "val", "sentences": [{"raw": f"c{i}"}] * 5}
             for i in range(5002)]
  (tmp_path / "d.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
  data = karpathy.load_karpathy(str(tmp_path / "d.json"), str(tmp_path / "images"))
  assert data.sizes["test"] == 5000 and data.has_folds
  assert data.names[-5:] == [f"test1k_{f}" for f in range(5)]
  folds = data.folds()
  assert [len(f) for f in folds] == [1000] * 5
  ids = np.concatenate([f.image_ids for f in folds])
  np.testing.assert_array_equal(ids, data.split("test").image_ids)   # in order, disjoint, covering
  assert folds[3][0].image_id == 30000 and folds[3].name == "test1k_3"
  assert sum(f.num_captions for f in folds) == 25000
  with pytest.raises(DataError, match="folds are test1k_0 .. test1k_4"):
    data.split("test1k_5")


def test_folds_need_the_5k_test_split(coco):
  data, _ = coco
  with pytest.raises(DataError, match="has 2 test images, not 5000: use split 'test'"):
    data.folds()


def test_user_errors_name_the_thing_and_the_fix(tmp_path, coco):
  data, image_root = coco
  with pytest.raises(DataError, match=f"{tmp_path}/nope.json does not exist: download"):
    karpathy.load_karpathy(str(tmp_path / "nope.json"), str(image_root))
  with pytest.raises(DataError, match=f"image root {tmp_path}/no_images is not a directory"):
    karpathy.load_karpathy(data.json_path, str(tmp_path / "no_images"))
  with pytest.raises(DataError, match="unknown split 'tset'.*has train, restval, val, test"):
    data.split("tset")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(DataError, match="bad.json is not valid JSON"):
    karpathy.load_karpathy(str(tmp_path / "bad.json"), str(image_root))
  (tmp_path / "other.json").write_text(json.dumps({"annotations": []}))
  with pytest.raises(DataError, match="no top-level 'images' list"):
    karpathy.load_karpathy(str(tmp_path / "other.json"), str(image_root))
  (tmp_path / "split.json").write_text(json.dumps({"images": [
      {"filename": "a.jpg", "imgid": 0, "split": "training", "sentences": []}]}))
  with pytest.raises(DataError, match=r"images\[0\] has split 'training'"):
    karpathy.load_karpathy(str(tmp_path / "split.json"), str(image_root))


def _epoch_batches(split, encoder, process_index=0, process_count=1, seed=0, batches=2,
                   global_batch_size=3):
  dataset = pipeline.train_dataset(
      split, global_batch_size=global_batch_size, seed=seed, text=encoder,
      transform=pipeline.TrainTransform(image=SPEC), process_index=process_index,
      process_count=process_count)
  it = iter(dataset)
  out = [next(it) for _ in range(batches)]
  return out, it.get_state()


def test_pipeline_skips_and_counts_the_corrupt_and_the_missing_image(coco, encoder):
  data, _ = coco
  split = data.split("train+restval")
  batches, state = _epoch_batches(split, encoder, batches=4)       # 4 x 3 = 2 epochs of 6 good
  for e in range(2):
    ids = np.concatenate([b["image_id"] for b in batches[2 * e:2 * e + 2]])
    assert sorted(ids.tolist()) == [COCO_ID_BASE + i for i in GOOD_TRAIN]
  # the counts are exact: one per bad item among the items read so far
  consumed = state["next_index"]
  order = [index for index, _ in pipeline.train_order(len(split), 0)[:consumed]]
  totals = {r: sum(b["stats"][r] for b in batches) for r in pipeline.SKIP_REASONS}
  assert totals == {"missing": order.count(MISSING), "corrupt": order.count(CORRUPT),
                    "no_caption": 0}
  assert totals["missing"] >= 1 and totals["corrupt"] >= 1
  for batch in batches:
    assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["text_ids"].shape == batch["text_mask"].shape == (3, 16)
    for image_id, slot, ids in zip(batch["image_id"], batch["caption_index"], batch["text_ids"]):
      text = caption(int(image_id) - COCO_ID_BASE, int(slot))
      np.testing.assert_array_equal(ids, encoder.encode([text])[0][0])


def test_pipeline_order_is_deterministic_for_a_seed(coco, encoder):
  data, _ = coco
  split = data.split("train+restval")
  first, _ = _epoch_batches(split, encoder, seed=3)
  again, _ = _epoch_batches(split, encoder, seed=3)
  other, _ = _epoch_batches(split, encoder, seed=4)
  for a, b in zip(first, again):
    for key in ("image", "image_id", "caption_index", "text_ids"):
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(first, other))


def test_two_hosts_read_disjoint_items_covering_the_epoch(coco, encoder):
  data, _ = coco
  split = data.split("train+restval")
  orders = [[index for index, _ in pipeline.train_order(len(split), 0, p, 2)[:4]] for p in (0, 1)]
  assert not set(orders[0]) & set(orders[1])
  assert sorted(orders[0] + orders[1]) == list(range(8))             # one epoch, each item once
  seen = []
  for p in (0, 1):   # global batch 2: one row per host and step
    good = [i for i in orders[p] if i not in (CORRUPT, MISSING)]
    batches, _ = _epoch_batches(split, encoder, process_index=p, process_count=2,
                                global_batch_size=2, batches=len(good))
    ids = [int(b["image_id"][0]) - COCO_ID_BASE for b in batches]
    assert ids == good                      # the host's share of epoch 0, in order, bad ones out
    seen += ids
  assert sorted(seen) == GOOD_TRAIN
