"""Unpaired image and caption pools for Leaner-and-Faster's task-agnostic stage 1 (paper 000
§3.2.1: "massively available non-paired data", Conceptual Captions used as a reservoir of
images and texts without their alignment) on the bundled benchmark.

The pool is one more split, "unpaired", generated with the benchmark's own machinery (the same
2x2 grids of Fashion-MNIST items and the same caption grammar) and disjoint from the stage-2
data by construction:
  - its items are Fashion-MNIST *train* images that no benchmark split uses (the train split's
    `source_indices` are removed from every class pool; val / test use the test images);
  - its layouts are usable layouts that no benchmark split (train, val or test) uses, so none of
    its captions is true of a stage-2 image (a caption parses to exactly its layout) and none of
    its images shows a stage-2 layout: no stage-2 pair appears in it, paired or not;
  - its randomness is its own stream, SeedSequence([data.seed, UNPAIRED_STREAM]).
Each pool example still has an image and 5 captions of it: stage 1's intra-modal losses (eq. 2,
eq. 3, MSE) read the images and the captions independently and never the pairing; only Table 2's
"stage-1_InfoNCE" ablation reads it, as the paper's InfoNCE on Conceptual Captions' alt-texts does.
Image ids start at SPLIT_ID_OFFSET; groups are consecutive runs of group_size examples (no
look-alike structure: the trainer's batches are made of whole groups).
"""

from __future__ import annotations

import numpy as np

from jaxdistill.data.compositional import (CAPTIONS_PER_IMAGE, EMPTY, NUM_CLASSES,
                                           CompositionalSplit, _captions_and_probe,
                                           _compose_images, _layout_index, _layout_space)
from jaxdistill.data.fashion_mnist import FashionMnist

SPLIT = "unpaired"
SPLIT_ID_OFFSET = 3_000_000        # after train 0, val 1e6, test 2e6 (compositional.SPLIT_ID_OFFSETS)
UNPAIRED_STREAM = 0x57A6E1         # the pool's own random stream, apart from the benchmark's


class UnpairedPoolError(ValueError):
  """A pool size the data cannot supply; the message names the key and the fix."""


def build_unpaired_pool(fmnist: FashionMnist, splits: dict[str, CompositionalSplit], *, seed: int,
                        num: int, group_size: int) -> CompositionalSplit:
  """`num` examples (a multiple of group_size) on layouts no split of `splits` uses, from train
  items the train split does not use; deterministic from `seed`."""
  if num <= 0 or num % group_size:
    raise UnpairedPoolError(f"--config.data.num_unpaired={num} must be a positive multiple of "
                            f"--config.data.group_size={group_size}")
  rng = np.random.default_rng([seed, UNPAIRED_STREAM])
  space = _layout_space()
  used = np.zeros(len(space.layouts), bool)
  for split in splits.values():
    used[_layout_index(split.layouts)] = True
  free = np.flatnonzero(space.usable & ~used)
  if len(free) < num:
    raise UnpairedPoolError(f"--config.data.num_unpaired={num}: only {len(free)} layouts are left "
                            "unused by the benchmark's splits; lower it (or the split sizes)")
  layouts = space.layouts[np.sort(rng.choice(free, num, replace=False))]
  layouts = layouts[rng.permutation(num)]
  taken = splits["train"].source_indices
  taken = taken[taken != EMPTY]
  sources = np.full(layouts.shape, EMPTY, np.int32)
  for class_id in range(NUM_CLASSES):
    pool = np.setdiff1d(np.flatnonzero(fmnist.train_labels == class_id), taken).astype(np.int32)
    where = layouts == class_id
    need = int(where.sum())
    if need > len(pool):
      raise UnpairedPoolError(f"--config.data.num_unpaired={num} needs {need} unused train images "
                              f"of class {class_id}, {len(pool)} are left: lower it")
    sources[where] = rng.permutation(pool)[:need]
  captions, probe_false = [], []
  for layout in layouts:
    texts, false = _captions_and_probe(layout, rng, CAPTIONS_PER_IMAGE)
    captions.append(texts)
    probe_false.append(false)
  return CompositionalSplit(
      images=_compose_images(sources, layouts, fmnist.train_images),
      layouts=layouts,
      captions=captions,
      image_ids=(SPLIT_ID_OFFSET + np.arange(num)).astype(np.int32),
      group_ids=(SPLIT_ID_OFFSET + np.arange(num) // group_size).astype(np.int32),
      is_swap_group=np.zeros(num, bool),
      source_indices=sources,
      probe_true=[texts[0] for texts in captions],
      probe_false=probe_false)
