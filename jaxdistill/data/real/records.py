"""The record every real-data loader returns and this package's user error.

A random-access source is any `Sequence[PairedRecord]` (`len`, `source[i]`); a streaming source
(webdataset shards) is a grain IterDataset of `webdataset.ShardSample`s wrapping the same record.
Images stay undecoded here: the pipeline opens, decodes, skips and counts them."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Union

import numpy as np

from jaxdistill.errors import JaxDistillError

# What a record's image can be: a file path, encoded bytes (JPEG / PNG / WebP ...), a decoded uint8
# array [H, W, 3] or [H, W, 1] / [H, W] (tfds decodes), or None (the sample has no image).
ImageRef = Union[str, bytes, np.ndarray, None]


class DataError(JaxDistillError, ValueError):
  """A dataset path, split, shard list or config file that cannot be used; the message names it
  and the fix."""


@dataclasses.dataclass(frozen=True)
class PairedRecord:
  """One image and its captions.

  image_id: int in [0, 2**31) (COCO: cocoid; Flickr30K: imgid; webdataset: the key, see
    `key_to_id`); the batch's image_id int32, used to mask duplicates in contrastive losses.
  image: see ImageRef; decoded lazily by the pipeline.
  captions: tuple of str as the source has them (empty ones included: the pipeline skips them).
  split: the split's name ("train", "restval", ...; "" when the source has none).
  key: file name relative to the image root, webdataset key or tfds file name.
  error: why the source could not read this record (e.g. "corrupt" for a damaged tar member or
    tfds record), None when it could; such a record is skipped and counted under that reason."""
  image_id: int
  image: ImageRef
  captions: tuple[str, ...] = ()
  split: str = ""
  key: str = ""
  error: str | None = None


def key_to_id(key: str) -> int:
  """A stable int in [0, 2**31) for a string key: the key itself when it is a decimal number
  below 2**31 (CC3M / LAION keys such as "000123456"), else CRC-32 of its UTF-8 bytes folded to
  31 bits (collisions are rare and only un-mask one pair in a contrastive loss)."""
  name = key.rsplit("/", 1)[-1]
  if name.isdigit() and int(name) < 2**31:
    return int(name)
  return zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF
