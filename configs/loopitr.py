r"""LoopITR (paper 003): dual encoder + cross encoder in one network, online distillation.

Run (CPU default, ~15 minutes on 2 cores, bundled compositional Fashion-MNIST benchmark):
  python -m jaxdistill.main --config=configs/loopitr.py --workdir=runs/loopitr
Other presets:  --config=configs/loopitr.py:tiny   (seconds; tests and smoke runs)
                --config=configs/loopitr.py:paper  (ViT-B/16 + 6-layer text + 6-layer cross, §4.1)
Ablations (paper 003 Tables 1-6), e.g.:
  --config.loopitr.num_negatives=1            (Table 1: m in 1, 4, 9, 14, 31)
  --config.loopitr.negative_sampling=random   (Table 2)
  --config.loopitr.distill_negatives=text     (Table 3: image | text | both | none)
  --config.loopitr.teacher=momentum           (Table 5: online | momentum | offline)
  --config.loopitr.teacher=offline --config.teachers.offline.path=runs/loopitr
Start the dual encoder from a trained dual-encoder run (config.init_from, train/init.py):
  --config.init_from='({"source": "workdir:runs/teacher_dual", "mapping": (("student/dual/", "student/"),)},)'

  --config.loopitr.stop_gradient=False        (Table 6)
"""

import ml_collections

from jaxdistill import config as base_config


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  config = base_config.base_config(preset)
  config.method = "loopitr"
  config.model.kind = "loopitr"
  # teacher=offline reads a finished LoopITR run: --config.teachers.offline.path=runs/loopitr
  config.teachers.offline = base_config.teacher_section("workdir")

  lp = config.loopitr = ml_collections.ConfigDict()
  lp.num_negatives = 4             # m, §4.2 Table 1 (performance saturates at 4)
  lp.negative_sampling = "hard"    # hard (top-m by ITC similarity) | random; Table 2
  lp.itm_negatives = "hard"        # ITM negatives: hard (from ITC) | random; Table 8d
  lp.distill_negatives = "both"    # image | text | both | none; Table 3
  lp.teacher = "online"            # online | momentum | offline; Table 5
  lp.momentum = 0.995              # EMA of the momentum teacher (Table 5c)
  lp.stop_gradient = True          # stop-grad on the teacher scores, eq. 7 / Table 6
  lp.distill_weight = 1.0          # weight reached after the warm-up, eq. 8
  lp.distill_warmup_steps = -1     # -1: one epoch of the train split (§4.1)
  lp.itc_weight = 1.0
  lp.itm_weight = 1.0
  lp.mlm_weight = 1.0
  lp.mlm_probability = 0.15        # BERT masking rate for L_mlm
  # ITC-only warm-up before ITM/MLM/distillation start (not in the paper). The CPU default spends
  # a third of its 600 steps on it: dual R@sum 128.4 vs 90.9 without (docs/results.md).
  lp.itc_only_steps = 200 if preset == "cpu" else 0
  return config
