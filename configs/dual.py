r"""Dual encoder + ITC (paper 000 stage 2), with or without corpus-mined hard negatives (HN).

Stage 2 in paper 000's order (docs/mining.md), on the bundled benchmark:
  python -m jaxdistill.main --config=configs/dual.py --workdir=runs/dual          # w/o HN
  python -m jaxdistill.main --config=configs/dual.py --workdir=runs/mine --mode=mine \
      --config.mining.tower_workdir=runs/dual                                      # ScaNN bank
  python -m jaxdistill.main --config=configs/dual.py --workdir=runs/dual_hn \
      --config.dual.hard_negatives=4 --config.mining.bank_dir=runs/mine/bank       # with HN
Presets: --config=configs/dual.py:tiny (seconds), :cpu (default), :paper.
The `mining` section (index parameters, K, which tower mines, bank path) is in jaxdistill/config.py.
"""

import ml_collections

from jaxdistill import config as base_config


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  config = base_config.base_config(preset)
  config.method = "dual"
  d = config.dual = ml_collections.ConfigDict()
  d.hard_negatives = 0   # k mined negatives per example and direction (paper 000 §3.2.2); 0 = w/o HN
  return config
