r"""MCAD (paper 001): dual-encoder student, dual-stream + single-stream teachers fused by a
trainable integration module; L_total = L_MT + L_MT_FA (eq. 7-9).

Run (CPU preset, bundled benchmark; teachers = the benchmark's, configs/teacher.py):
  python -m jaxdistill.main --config=configs/teacher.py:dual --workdir=runs/teacher_dual
  python -m jaxdistill.main --config=configs/teacher.py:cpu --workdir=runs/teacher
  python -m jaxdistill.main --config=configs/mcad.py --workdir=runs/mcad
Presets: --config=configs/mcad.py:tiny (seconds; tests set the teacher paths), :cpu (default),
         :paper (k = 11, lr 1e-4, two-layer MLPs; App. A-B)
Table 1 (one switch; same student, steps, seed; methods/mcad.py TABLE_1):
  --config.mcad.loss=gt | clip | gt+clip | albef+gt | clip+clip_fa | mt | mt+mt_fa
Table 4:  --config.mcad.k=5 | 11 | 17
"""

import ml_collections

from jaxdistill import config as base_config


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  config = base_config.base_config(preset)
  config.method = "mcad"
  tiny, paper = preset == "tiny", preset == "paper"
  if paper:   # paper 001 App. A: AdamW, lr 1e-4 (the ALBERT + MobileViT rows), warm-up + cosine
    config.optim.learning_rate = 1e-4

  # The student's embedding width is the dual teacher's (configs/teacher.py: 256), so that
  # L_CLIP_FA (eq. 17) can dot student features with teacher features: one student for every row.
  config.model.embed_dim = 32 if tiny else 256

  mc = config.mcad = ml_collections.ConfigDict()
  mc.loss = "mt+mt_fa"             # '+'-separated terms of methods/mcad.py TERMS (Table 1)
  mc.k = 4 if tiny else 11         # top-k pairs of the dual teacher (eq. 5; Table 4)
  mc.teacher_temperature = 0.0     # tau^DS of eq. 4; 0 = the dual teacher's own learnt one
  ic = mc.integration = ml_collections.ConfigDict()
  ic.mlp_depth = 2                 # g1..g4: "two-layer MLPs" (App. B)
  ic.mlp_dim = 64 if tiny else 512
  ic.alpha_init = 1.0              # the paper gives none; 0 would stop g1 / g2's gradient
  ic.temperature_init = 0.07       # tau^T of the integrated teacher (eq. 3; learnt)

  config.teachers.dual = base_config.teacher_section("workdir", "" if tiny else "runs/teacher_dual")
  config.teachers.cross = base_config.teacher_section("workdir", "" if tiny else "runs/teacher")
  return config
