"""Karpathy & Fei-Fei's (CVPR 2015) caption splits: `dataset_coco.json` / `dataset_flickr30k.json`
/ `dataset_flickr8k.json` plus the folder of images, the format most retrieval code reads.

JSON: {"dataset": "coco", "images": [{"filepath": "val2014" (COCO only), "filename": "...jpg",
"imgid": int, "cocoid": int (COCO only), "split": "train" | "restval" | "val" | "test",
"sentences": [{"raw": "A man ...", "tokens": [...], ...}, ...]}, ...]}. An image's file is
image_root/filepath/filename (image_root/filename without filepath). Split sizes are the JSON's
(COCO: 113,287 train + restval, 5,000 val, 5,000 test; Flickr30K: 29,000 / 1,014 / 1,000).
Split names: the JSON's, any "+" union of them ("train+restval", the usual training set), and
for COCO's 5,000-image test split the 1K folds "test1k_0" .. "test1k_4" (test images
[1000 f, 1000 (f + 1)) in JSON order, the COCO 1K protocol's five folds)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from jaxdistill.data.real.records import DataError, PairedRecord

SPLITS = ("train", "restval", "val", "test")
COCO_TEST_IMAGES, FOLD_IMAGES, NUM_FOLDS = 5000, 1000, 5
FOLD_PREFIX = "test1k_"


class KarpathySplit(Sequence):
  """A random-access split: records[i] -> PairedRecord with the image's path (not opened).
  image_ids int64 [N], paths list[str], captions list[tuple[str, ...]] in JSON order."""

  def __init__(self, name: str, image_ids: np.ndarray, paths: list[str], keys: list[str],
               captions: list[tuple[str, ...]]):
    self.name, self.image_ids, self.paths, self.keys, self.captions = (
        name, image_ids, paths, keys, captions)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> PairedRecord:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for split {self.name!r} of {len(self)} images")
    return PairedRecord(image_id=int(self.image_ids[index]), image=self.paths[index],
                        captions=self.captions[index], split=self.name, key=self.keys[index])

  @property
  def num_captions(self) -> int:
    return sum(len(c) for c in self.captions)

  def subset(self, name: str, start: int, stop: int) -> "KarpathySplit":
    return KarpathySplit(name, self.image_ids[start:stop], self.paths[start:stop],
                         self.keys[start:stop], self.captions[start:stop])


class KarpathyDataset:
  """A loaded Karpathy JSON: `dataset` ("coco", "flickr30k", ...), `split(name)`, `sizes`."""

  def __init__(self, dataset: str, json_path: str, splits: dict[str, KarpathySplit]):
    self.dataset, self.json_path, self._splits = dataset, json_path, splits

  @property
  def sizes(self) -> dict[str, int]:
    """Images per split of the JSON, e.g. {"train": 113287, "restval": 0, ...}."""
    return {name: len(split) for name, split in self._splits.items()}

  @property
  def has_folds(self) -> bool:
    return len(self._splits.get("test", ())) == COCO_TEST_IMAGES

  @property
  def names(self) -> list[str]:
    """The single split names this dataset answers (unions "a+b" come on top)."""
    folds = [f"{FOLD_PREFIX}{f}" for f in range(NUM_FOLDS)] if self.has_folds else []
    return [n for n, s in self._splits.items() if len(s)] + folds

  def split(self, name: str) -> KarpathySplit:
    """`name`: a split of the JSON, a "+" union ("train+restval", in that order) or a 1K fold."""
    parts = name.split("+")
    if len(parts) > 1:
      splits = [self.split(part) for part in parts]
      return KarpathySplit(name, np.concatenate([s.image_ids for s in splits]),
                           [p for s in splits for p in s.paths],
                           [k for s in splits for k in s.keys],
                           [c for s in splits for c in s.captions])
    if name.startswith(FOLD_PREFIX) and name[len(FOLD_PREFIX):].isdigit():
      fold = int(name[len(FOLD_PREFIX):])
      test = self._splits.get("test")
      if not self.has_folds:
        raise DataError(f"split {name!r}: the 1K folds are the COCO 5K test split cut in five; "
                        f"{self.json_path} has {len(test) if test else 0} test images, not "
                        f"{COCO_TEST_IMAGES}: use split 'test' (e.g. Flickr30K's 1K test)")
      if fold >= NUM_FOLDS:
        raise DataError(f"split {name!r}: folds are {FOLD_PREFIX}0 .. {FOLD_PREFIX}{NUM_FOLDS - 1}")
      return test.subset(name, fold * FOLD_IMAGES, (fold + 1) * FOLD_IMAGES)
    if name not in self._splits or not len(self._splits[name]):
      raise DataError(f"unknown split {name!r} for {self.json_path}: it has "
                      f"{', '.join(self.names)} (and '+' unions such as 'train+restval')")
    return self._splits[name]

  def folds(self) -> list[KarpathySplit]:
    """The five COCO 1K test folds (DataError unless the test split has 5,000 images)."""
    return [self.split(f"{FOLD_PREFIX}{f}") for f in range(NUM_FOLDS)]


def _captions(entry: dict, where: str) -> list[str]:
  sentences = entry.get("sentences")
  if not isinstance(sentences, list):
    raise DataError(f"{where} has no 'sentences' list; is this a Karpathy dataset_*.json?")
  out = []
  for s in sentences:
    raw = s.get("raw") if isinstance(s, dict) else None
    if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
      raw = " ".join(s["tokens"])
    if not isinstance(raw, str):
      raise DataError(f"{where}: a sentence has neither 'raw' text nor 'tokens'")
    out.append(raw.strip())
  return out


def load_karpathy(json_path: str, image_root: str, *, max_captions: int | None = 5
                  ) -> KarpathyDataset:
  """Reads a Karpathy JSON; image files are not opened (the pipeline does, skipping missing and
  corrupt ones). max_captions: keep the first k captions of each image (5: the standard
  5-per-image protocol; COCO has a few images with 6 or 7); None keeps all."""
  if not os.path.isfile(json_path):
    raise DataError(f"Karpathy split file {json_path} does not exist: download "
                    "caption_datasets.zip (Karpathy & Fei-Fei 2015) and point at its "
                    "dataset_coco.json / "
                    "dataset_flickr30k.json")
  if not os.path.isdir(image_root):
    raise DataError(f"image root {image_root} is not a directory: point it at the folder holding "
                    "the images (COCO: the folder with train2014/ and val2014/; Flickr30K: "
                    "flickr30k-images/)")
  try:
    with open(json_path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{json_path} is not valid JSON ({e}); re-extract it from caption_datasets.zip"
                    ) from e
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise DataError(f"{json_path} has no top-level 'images' list; is it a Karpathy dataset_*.json?")
  if max_captions is not None and max_captions < 1:
    raise ValueError(f"max_captions={max_captions} must be >= 1 or None")
  columns = {name: ([], [], [], []) for name in SPLITS}
  for i, entry in enumerate(data["images"]):
    where = f"{json_path}: images[{i}]"
    if not isinstance(entry, dict) or "filename" not in entry:
      raise DataError(f"{where} has no 'filename'")
    split = entry.get("split")
    if split not in columns:
      raise DataError(f"{where} has split {split!r}; Karpathy splits are {', '.join(SPLITS)}")
    image_id = entry.get("cocoid", entry.get("imgid"))
    if not isinstance(image_id, int) or not 0 <= image_id < 2**31:
      raise DataError(f"{where} has no integer 'cocoid' / 'imgid' in [0, 2**31)")
    key = os.path.join(entry.get("filepath", ""), entry["filename"])
    captions = _captions(entry, where)[:max_captions]
    ids, paths, keys, caps = columns[split]
    ids.append(image_id)
    paths.append(os.path.join(image_root, key))
    keys.append(key)
    caps.append(tuple(captions))
  splits = {name: KarpathySplit(name, np.asarray(ids, np.int64), paths, keys, caps)
            for name, (ids, paths, keys, caps) in columns.items()}
  return KarpathyDataset(str(data.get("dataset", "")), json_path, splits)
