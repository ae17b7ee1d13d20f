r"""MCAD (paper 001): dual-encoder student, dual-stream + single-stream teachers fused by a
trainable integration module; L_total = L_MT + L_MT_FA (eq. 7-9).

Run (CPU preset, bundled benchmark; teachers = the benchmark's, configs/teacher.py: the dual
stream is the pretrained towers after ITC, ~12 min here, the single stream the cross encoder
trained on them, ~30-40 min):
  python -m jaxdistill.main --config=configs/teacher.py:towers --workdir=runs/loopitr_itc
  python -m jaxdistill.main --config=configs/teacher.py:cross --workdir=runs/cross_positions_s0
  python -m jaxdistill.main --config=configs/mcad.py --workdir=runs/mcad
Presets: --config=configs/mcad.py:tiny (seconds; tests set the teacher paths),
         :cpu (default: the student of `make train`'s dual encoder, MiniLM-L6's first 3 layers
         with its WordPiece, which both teachers share, + the cpu ViT, embed_dim 128 = the dual
         teacher's; 200 steps at batch 64 on 2 CPU cores; docs/mcad.md's Table 1),
         :paper (k = 11, lr 1e-4, two-layer MLPs; App. A-B; teachers of the `dual` / `cpu`
         teacher presets, embed_dim 256),
         :mobile (paper 001 §4.3's phone student, MobileViTv2 + TinyBERT there: here the ImageNet
         EfficientNet-Lite0 image tower at 64 px and MiniLM-L6's first 3 layers, both from the
         packaged weights via init_from; export: docs/export.md; teachers configs/lit_teacher.py
         -> runs/lit_teacher, configs/loopitr.py -> runs/loopitr)
Table 1 (one switch; same student, steps, seed; methods/mcad.py TABLE_1;
experiments/mcad_table1.sh runs every row and seed):
  --config.mcad.loss=gt | clip | gt+clip | albef+gt | clip+clip_fa | mt | mt+mt_fa
Table 4:  --config.mcad.k=5 | 11 | 17
"""

import ml_collections

from jaxdistill import config as base_config
from jaxdistill.pretrained import tower_configs

PRESETS = ("tiny", "cpu", "paper", "mobile")
MOBILE_TEXT_LAYERS = 3           # MiniLM-L6 truncated (TinyBERT-4 in paper 001 §4.3)
MOBILE_INPUT_SIZE = 64           # 56 px grid -> 64 px: a 2 x 2 head map, one slot per grid cell


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown mcad preset {preset!r}: use one of {', '.join(PRESETS)} "
                     "(e.g. --config=configs/mcad.py:cpu)")
  mobile = preset == "mobile"
  config = base_config.base_config("cpu" if mobile else preset)
  config.method = "mcad"
  tiny, paper = preset == "tiny", preset == "paper"
  if paper:   # paper 001 App. A: AdamW, lr 1e-4 (the ALBERT + MobileViT rows), warm-up + cosine
    config.optim.learning_rate = 1e-4

  # Per preset: the teachers' workdirs and the student's embedding width, which is the dual
  # teacher's (L_CLIP_FA, eq. 17, dots student features with its features): one student for
  # every row. The mobile teachers tokenize as MiniLM does (methods/mcad.py checks it): the LiT
  # teacher (MiniLM-L6 + EfficientNet-Lite0) and the MiniLM LoopITR run.
  dual, cross, config.model.embed_dim = {
      "tiny": ("", "", 32), "cpu": ("runs/loopitr_itc", "runs/cross_positions_s0", 128),
      "paper": ("runs/teacher_dual", "runs/teacher", 256),
      "mobile": ("runs/lit_teacher", "runs/loopitr", 256)}[preset]
  if preset == "cpu":   # the teachers read the student's token ids: all tokenize as MiniLM
    tower_configs.minilm(config, "student/", layers=3)
    # 2 CPU cores: the online cross teacher runs 2nk = 1,408 pairs a step
    config.batch_size, config.train.num_steps = 64, 200
  if mobile:   # model.kind=dual: the towers are student/image_encoder, student/text_encoder
    tower_configs.efficientnet_lite0(config, "student/", MOBILE_INPUT_SIZE)
    tower_configs.minilm(config, "student/", MOBILE_TEXT_LAYERS)
    # GELU's tanh form (|difference| <= 5e-4 from MiniLM's erf GELU): TFLite fuses it into its
    # GELU op, which runs in int8; erf does not quantise (docs/export.md, full-integer int8)
    config.model.bert_hidden_act = "gelu_pytorch_tanh"
    # 2 CPU cores: MiniLM's 3 layers over 36 tokens dominate a step (~4.6 s at batch 32 with
    # L_GT, shared machine): 200 steps ~15 min (docs/benchmarks.md)
    config.batch_size, config.train.num_steps = 32, 200
    config.optim.warmup_steps, config.train.checkpoint_every = 20, 100

  mc = config.mcad = ml_collections.ConfigDict()
  mc.loss = "mt+mt_fa"             # '+'-separated terms of methods/mcad.py TERMS (Table 1)
  mc.k = 4 if tiny else 11         # top-k pairs of the dual teacher (eq. 5; Table 4)
  mc.teacher_temperature = 0.0     # tau^DS of eq. 4; 0 = the dual teacher's own learnt one
  ic = mc.integration = ml_collections.ConfigDict()
  ic.mlp_depth = 2                 # g1..g4: "two-layer MLPs" (App. B)
  ic.mlp_dim = 64 if tiny else 512
  ic.alpha_init = 1.0              # the paper gives none; 0 would stop g1 / g2's gradient
  ic.temperature_init = 0.07       # tau^T of the integrated teacher (eq. 3; learnt)

  config.teachers.dual = base_config.teacher_section("workdir", dual)
  config.teachers.cross = base_config.teacher_section("workdir", cross)
  if mobile:
    config.preset = "mobile"
  return config
