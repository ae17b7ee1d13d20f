"""Paired datasets from tensorflow-datasets through `tfds.data_source` (random access over
ArrayRecord files, no TensorFlow graph): today `coco_captions` (COCO 2014 with Karpathy &
Fei-Fei's train / restval / val / test splits; "train+restval" works as tfds split arithmetic).
tensorflow-datasets 4.9.10 has no Flickr30K builder: read Flickr30K with `karpathy.py`
(dataset_flickr30k.json + flickr30k-images/).

tfds must have prepared the dataset as ArrayRecord first, once:
  tfds build coco_captions --file_format=array_record --data_dir=DATA_DIR
(this loader never downloads). tfds decodes the image itself (uint8 [H, W, 3]); the pipeline
crops and normalises it like any other image."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxdistill.data.real.records import DataError, PairedRecord

# builder -> (its split names, caption feature, text key inside it, image-id feature, file name)
BUILDERS = {
    "coco_captions": (("train", "restval", "val", "test"), "captions", "text", "image/id",
                      "image/filename"),
}


def _str(value: Any) -> str:
  text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
  return text.strip()


class TfdsPairedSource(Sequence):
  """`tfds.data_source` of one builder and split as PairedRecords: image = tfds's decoded uint8
  array, captions = the example's caption texts (first max_captions), image_id = its image/id.
  A record tfds fails to read comes back with error "corrupt" (the pipeline skips and counts it)."""

  def __init__(self, source: Sequence[dict], name: str, split: str, max_captions: int | None):
    self._source, self.name, self.split, self.max_captions = source, name, split, max_captions

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> PairedRecord:
    _, caption_key, text_key, id_key, file_key = BUILDERS[self.name]
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {self.name}[{self.split}] of {len(self)}")
    try:
      example = self._source[int(index)]
    except Exception as e:  # a damaged ArrayRecord or image; tfds raises assorted types
      logging.warning("tfds %s[%s] record %d cannot be read: %s", self.name, self.split, index, e)
      return PairedRecord(image_id=-1, image=None, split=self.split, key=str(index),
                          error="corrupt")
    texts = [_str(t) for t in np.asarray(example[caption_key][text_key]).reshape(-1)]
    return PairedRecord(image_id=int(example[id_key]) & 0x7FFFFFFF, image=example["image"],
                        captions=tuple(texts[:self.max_captions]), split=self.split,
                        key=_str(example.get(file_key, index)))


def load_tfds(name: str, split: str, *, data_dir: str | None = None,
              max_captions: int | None = 5) -> TfdsPairedSource:
  """Random access to `name`'s `split` ("train", "train+restval", "test", ...). DataError for an
  unknown builder or split, or a dataset not prepared as ArrayRecord under data_dir."""
  import tensorflow_datasets as tfds   # slow to import (TensorFlow): only when used
  if name not in BUILDERS:
    hint = (" (tensorflow-datasets has no Flickr30K builder: read dataset_flickr30k.json with "
            "jaxdistill.data.real.karpathy.load_karpathy)" if "flickr" in name.lower() else "")
    raise DataError(f"tfds dataset {name!r} is not supported{hint}; supported: "
                    f"{', '.join(sorted(BUILDERS))}")
  splits = BUILDERS[name][0]
  for part in split.split("+"):
    if part not in splits:
      raise DataError(f"unknown split {split!r} of tfds {name}: it has {', '.join(splits)} "
                      "(and '+' unions such as 'train+restval')")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError,
          AssertionError) as e:
    raise DataError(f"tfds {name} is not prepared as ArrayRecord under data_dir={data_dir!r} "
                    f"({type(e).__name__}); run once: tfds build {name} "
                    f"--file_format=array_record --data_dir={data_dir or '~/tensorflow_datasets'}"
                    ) from e
  return TfdsPairedSource(source, name, split, max_captions)
