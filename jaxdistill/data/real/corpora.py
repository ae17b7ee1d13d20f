"""Unpaired corpora for Leaner-and-Faster's stage 1 (paper 000 §3.2.1: images and texts used
without their alignment): a folder of images and a text file of captions, both as random-access
PairedRecord sequences (image-only records without captions, text-only records without an
image), so `pipeline.train_dataset(..., fields="image" | "text")` reads them like any split.
Webdataset shards serve the same purpose through `pipeline.stream_train_dataset(fields=...)`,
which reads only the modality asked for."""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxdistill.data.real.records import DataError, PairedRecord
from jaxdistill.data.real.webdataset import IMAGE_EXTENSIONS


class ImageFolder(Sequence):
  """Every image file under `root` (recursive; extensions IMAGE_EXTENSIONS, any case), sorted by
  relative path; record i: image_id i, image = the path, no captions."""

  def __init__(self, root: str, *, split: str = "unpaired"):
    if not os.path.isdir(root):
      raise DataError(f"image folder {root} is not a directory; point it at the unpaired images")
    self.root, self.split = root, split
    self.keys = sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root) for f in files
        if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and not f.startswith("."))
    if not self.keys:
      raise DataError(f"image folder {root} holds no {' / '.join(IMAGE_EXTENSIONS)} files")

  def __len__(self) -> int:
    return len(self.keys)

  def __getitem__(self, index: int) -> PairedRecord:
    key = self.keys[index]
    return PairedRecord(image_id=index % len(self), image=os.path.join(self.root, key),
                        split=self.split, key=key)


class TextCorpus(Sequence):
  """One caption per line of a UTF-8 text file (line i: image_id i, no image); blank lines are
  kept as empty captions, which the pipeline skips and counts."""

  def __init__(self, path: str, *, split: str = "unpaired"):
    if not os.path.isfile(path):
      raise DataError(f"text corpus {path} does not exist; point it at a file of one caption per "
                      "line")
    with open(path, encoding="utf-8", errors="replace") as f:
      self.lines = [line.strip() for line in f]
    if not self.lines:
      raise DataError(f"text corpus {path} is empty")
    self.path, self.split = path, split

  def __len__(self) -> int:
    return len(self.lines)

  def __getitem__(self, index: int) -> PairedRecord:
    return PairedRecord(image_id=index % len(self), image=None, captions=(self.lines[index],),
                        split=self.split, key=str(index % len(self)))
