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

import os
import sys

import numpy as np

from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.data.compositional import CAPTIONS_PER_IMAGE
from jaxdistill.data.negatives import Bank
from jaxdistill.store.run import load_run_config

BANKS = (("mine_teacher", "i2t"), ("mine_student_image", "t2i"))


def main(pipeline_workdir: str) -> None:
  run = os.path.join(pipeline_workdir, "student_image")
  config = load_run_config(run)
  k = int(config.leaner_faster.hard_negatives)
  train = prepare_benchmark(config, run).splits["train"]
  order = np.argsort(train.image_ids)
  layout_of = lambda image_ids: train.layouts[order[np.searchsorted(train.image_ids[order],
                                                                    image_ids)]]
  print(f"train: {len(train.layouts)} images, {len({tuple(x) for x in train.layouts})} "
        "distinct layouts")
  for stage, direction in BANKS:
    bank = Bank(os.path.join(pipeline_workdir, stage, "bank", f"{direction}.npy"))
    keys, ids = np.asarray(bank.keys), np.asarray(bank.ids[:, :k])
    if direction == "i2t":   # key: image id; ids: caption ids
      positive, negative = layout_of(keys), layout_of(ids // CAPTIONS_PER_IMAGE)
    else:                    # key: caption id; ids: image ids
      positive, negative = layout_of(keys // CAPTIONS_PER_IMAGE), layout_of(ids)
    positive = positive[:, None]
    differing = (negative != positive).sum(-1)
    same_items = (np.sort(negative, -1) == np.sort(positive, -1)).all(-1) & (differing > 0)
    print(f"{stage}/{direction} top-{k} ({ids.size} negatives): same layout "
          f"{np.mean(differing == 0):.1%}, same items elsewhere {np.mean(same_items):.1%}, "
          f"one cell different {np.mean(differing == 1):.1%}")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  main(sys.argv[1])
