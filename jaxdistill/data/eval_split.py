"""What evaluation, the teacher cache and export read of one split, whatever the dataset:
`EvalSplit` (images as an array or a lazily decoding array-like, every caption's token ids, the
caption -> image map) and `image_failures` (which images could not be read)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  """One split, image-major.

  images: [N, H, W, C] float32, normalised as the student sees them: a numpy array (the bundled
    benchmark) or an array-like that decodes the rows it is sliced for (real data,
    data/real/dataset.py `LazyImages`; an image that cannot be read comes back as zeros and is
    listed by `image_failures`).
  image_ids: int [N] (the dataset's ids: COCO cocoid, ...); captions: N tuples of str.
  text_ids / text_mask: int32 [T, L], every usable caption; caption_to_image: int32 [T] (row of
    `images`); caption_index: int32 [T] (which caption of its image).
  probe: (true_ids, true_mask, false_ids, false_mask) int32 [N, L] each, the binding probe of
    the bundled benchmark, or None.
  folds: {name: image rows int [n]}: sub-protocols averaged beside the whole split (COCO's five
    1K test folds as "1k"), or {}.
  dataset: name for reports (CLIP_benchmark's "dataset" field).
  skipped: items left out while building the split, by reason (e.g. {"empty_caption": 1}).
  """
  name: str
  dataset: str
  images: Any
  image_ids: np.ndarray
  captions: list[tuple[str, ...]]
  text_ids: np.ndarray
  text_mask: np.ndarray
  caption_to_image: np.ndarray
  caption_index: np.ndarray
  probe: tuple[np.ndarray, ...] | None = None
  folds: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_images(self) -> int:
    return len(self.image_ids)


def image_failures(images: Any) -> dict[int, str]:
  """{row: reason ("missing" | "corrupt")} of the rows of `images` that could not be read so far
  (a numpy array: none). Read it after the rows were sliced."""
  return dict(getattr(images, "failures", {}))


def captions_matrix(split: EvalSplit, per_image: int) -> tuple[np.ndarray, np.ndarray]:
  """text_ids / text_mask laid out [N, per_image, L] (caption c of image i at [i, c]); a caption
  slot the image lacks is all-zero ids with mask 0. For the teacher cache's fixed layout."""
  length = split.text_ids.shape[1]
  ids = np.zeros((split.num_images, per_image, length), np.int32)
  mask = np.zeros_like(ids)
  keep = split.caption_index < per_image
  ids[split.caption_to_image[keep], split.caption_index[keep]] = split.text_ids[keep]
  mask[split.caption_to_image[keep], split.caption_index[keep]] = split.text_mask[keep]
  return ids, mask
