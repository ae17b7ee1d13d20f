r"""How much a CPRD similarity bank (paper 002 §3.2.2) has to say: the teacher's P(match) on
each query's candidates, split into the query's own (positives) and the others (negatives).

  .venv/bin/python experiments/cprd_bank_scores.py runs/cprd_pt_bank/teacher_cache/train [--m=0.75]

Prints per direction the share of negatives with P(match) >= m, 0.5, 0.1, their median, the
positives' median, and the valid (P >= m) negatives per query (docs/cprd.md).
"""

import argparse

import numpy as np

from jaxdistill.data.compositional import CAPTIONS_PER_IMAGE
from jaxdistill.teachers.cache import FeatureCache


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("cache", help="a finished teacher cache with an i2t + t2i bank")
  parser.add_argument("--m", type=float, default=0.75, help="CPRD's validity threshold (eq. 4)")
  args = parser.parse_args()
  cache, c = FeatureCache(args.cache), CAPTIONS_PER_IMAGE
  n = cache.i2t_index.shape[0]
  own = {"i2t": (np.asarray(cache.i2t_index) // c) == np.arange(n)[:, None],   # its captions
         "t2i": np.asarray(cache.t2i_index) == (np.arange(n * c) // c)[:, None]}  # its image
  for name in ("i2t", "t2i"):
    score, mine = np.asarray(getattr(cache, f"{name}_score")), own[name]
    neg, pos = score[~mine], score[mine]
    share = lambda t: f"{np.mean(neg >= t):.3f}"
    print(f"{name}: {neg.size} negatives: P >= {args.m} {share(args.m)}, >= 0.5 {share(0.5)}, "
          f">= 0.1 {share(0.1)}, median {np.median(neg):.4f} | {pos.size} positives: median "
          f"{np.median(pos):.3f} | valid negatives per query "
          f"{np.mean(((score >= args.m) & ~mine).sum(1)):.2f}")


if __name__ == "__main__":
  main()
