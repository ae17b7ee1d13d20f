r"""How close a Leaner-and-Faster pipeline's mined hard negatives are to their positives, on the
bundled benchmark (docs/leaner_faster.md, Table 2's observation 2):

  python experiments/hard_negative_overlap.py runs/lf_short_full_s0

For T''s i2t bank (student_image's HN: key = train image, ids = caption ids, 5 per image) and the
student image tower's t2i bank (student_text's HN: key = caption, ids = images), over the top-k
that training uses (config.leaner_faster.hard_negatives): the share of negatives whose layout
equals the positive's (a false negative: the caption describes the image), holds the same items
in other cells, or differs from it in exactly one cell.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from jaxdistill.data.compositional import build_benchmark
from jaxdistill.data.fashion_mnist import load_fashion_mnist

CAPTIONS_PER_IMAGE = 5
BANKS = (("mine_teacher", "i2t"), ("mine_student_image", "t2i"))


def main(pipeline_workdir: str) -> None:
  with open(os.path.join(pipeline_workdir, "student_image", "config.json")) as f:
    config = json.load(f)
  d, k = config["data"], int(config["leaner_faster"]["hard_negatives"])
  train = build_benchmark(load_fashion_mnist(d["fashion_mnist_dir"] or None), seed=d["seed"],
                          num_train=d["num_train"], num_val=d["num_val"], num_test=d["num_test"],
                          group_size=d["group_size"], swap_fraction=d["swap_fraction"])["train"]
  layouts = train.layouts.astype(np.int64)
  print(f"train: {len(layouts)} images, {len({tuple(x) for x in layouts})} distinct layouts")
  for stage, direction in BANKS:
    bank = np.load(os.path.join(pipeline_workdir, stage, "bank", f"{direction}.npy"))
    keys, ids = bank["key"], bank["ids"][:, :k]
    if direction == "i2t":
      positive, negative = layouts[keys], layouts[ids // CAPTIONS_PER_IMAGE]
    else:
      positive, negative = layouts[keys // CAPTIONS_PER_IMAGE], layouts[ids]
    positive = positive[:, None]
    differing = (negative != positive).sum(-1)
    same_items = (np.sort(negative, -1) == np.sort(positive, -1)).all(-1)
    print(f"{stage}/{direction} top-{k} ({ids.size} negatives): same layout "
          f"{np.mean(differing == 0):.1%}, same items elsewhere {np.mean(same_items & (differing > 0)):.1%}, "
          f"one cell different {np.mean(differing == 1):.1%}")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  main(sys.argv[1])
