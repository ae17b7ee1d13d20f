r"""CPRD (paper 002): dual-encoder student, momentum queues, contrastive partial ranking
distillation from a frozen cross-encoder teacher (a trained LoopITR run).

Run (CPU preset, bundled compositional Fashion-MNIST benchmark; teacher = runs/loopitr):
  python -m jaxdistill.main --config=configs/cprd.py --workdir=runs/cprd
Other presets:  --config=configs/cprd.py:tiny   (seconds; tests — set --config.teachers.teacher.path)
                --config=configs/cprd.py:paper  (N_q 57,856, N_c 16,384, K 16, m 0.75, §4.2)
                --config=configs/cprd.py:pretrained  (the student of `make train`'s dual encoder:
                  MiniLM-L6's first 3 layers, mean pooling, its WordPiece, and the cpu ViT;
                  teacher runs/cross_positions_s0, configs/loopitr_long.py:cross_positions, whose
                  cross encoder ranks better than its dual similarity; 200 steps at batch 64,
                  K = 8: docs/cprd.md's cross-teacher table)
Table 5 (one switch; same student, steps, seed):
  --config.cprd.distill=none | kl | m3se | rm3se | cprd | cprd_mstar
Ablations:
  --config.cprd.cross_queue_size=4096        (Table 2: N_c in 0, 1024, 4096, 16384, 32768)
  --config.cprd.num_hard=8                   (Table 3: K in 2, 4, 8, 16, 32)
  --config.cprd.threshold=0.5                (Table 4: m in 0, 0.5, 0.75, 0.9, 1)
  --config.cprd.teacher_scores=dual          (the teacher's dual-encoder cosine as the target)
Offline variant (§3.2.2; scores from the similarity bank, no teacher in the step):
  python -m jaxdistill.main --config=configs/cprd.py --workdir=runs/cprd --mode=cache_teacher
  python -m jaxdistill.main --config=configs/cprd.py --workdir=runs/cprd \
      --config.cprd.bank_dir=runs/cprd/teacher_cache/train
"""

import ml_collections

from jaxdistill import config as base_config
from jaxdistill.pretrained import tower_configs

PRESETS = ("tiny", "cpu", "paper", "pretrained")


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown cprd preset {preset!r}: use one of {', '.join(PRESETS)} "
                     "(e.g. --config=configs/cprd.py:cpu)")
  pretrained = preset == "pretrained"
  config = base_config.base_config("cpu" if pretrained else preset)
  config.method = "cprd"
  tiny, paper = preset == "tiny", preset == "paper"
  if pretrained:   # the teacher reads the student's token ids: both tokenize as MiniLM does
    tower_configs.minilm(config, "student/", layers=3)
    # 2 CPU cores: the online teacher's text tower embeds B*K + B captions a step (~3 s)
    config.batch_size, config.train.num_steps = 64, 200
  if paper:   # paper 002 §4.2: batch 512, AdamW lr 3e-4 warmed up over 2000 steps, cosine to 1e-5
    config.batch_size = 512
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 2000

  cp = config.cprd = ml_collections.ConfigDict()
  cp.distill = "cprd"            # none | kl | m3se | rm3se | cprd | cprd_mstar (Table 5)
  cp.teacher_scores = "cross"    # cross (sigmoid of the ITM logit) | dual (teacher cosine)
  cp.momentum = 0.995            # EMA of the momentum encoder (§4.2)
  # N_q: queue of momentum features (§4.2: 57,856); tiny: not a multiple of the batch on purpose.
  cp.queue_size = 40 if tiny else (57_856 if paper else 1024)
  cp.cross_queue_size = 24 if tiny else (16_384 if paper else 512)   # N_c (Table 2)
  cp.num_hard = 4 if tiny else (8 if pretrained else 16)             # K (Table 3)
  cp.threshold = 0.75                                                # m (Table 4)
  cp.distill_weight = 1.0                                            # eq. 9: L_align + L_CPRD
  # Offline CPRD (§3.2.2): a teacher cache of the train split with a cross bank, e.g.
  # runs/student/teacher_cache/train from --mode=cache_teacher; "" = score online.
  cp.bank_dir = ""

  # The frozen teacher (online scores): a trained LoopITR run (cross + dual) or a dual run.
  config.teachers.teacher = base_config.teacher_section(
      "workdir", "" if tiny else ("runs/cross_positions_s0" if pretrained else "runs/loopitr"))
  config.teacher_cache.teacher = "teacher"   # --mode=cache_teacher caches it (offline bank)
  return config
