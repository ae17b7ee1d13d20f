r"""Larger networks trained on the bundled benchmark, to serve as frozen teachers
(jaxdistill/teachers/workdir.py `from_workdir`). Use one as
  --config.teachers.<name>.kind=workdir --config.teachers.<name>.path=runs/teacher_dual

Every preset widens all towers to 256 and deepens them to 4 layers (8 heads, MLP 512,
embedding 256: 6.3x the cpu student's tower params). Presets (on top of jaxdistill/config.py's):
  dual   (default) the dual-encoder ITC recipe (configs/dual.py) for 1500 steps at batch 128:
         a dual teacher (embed_images / embed_texts; no cross encoder). 20-34 min on an idle 2-core CPU.
         python -m jaxdistill.main --config=configs/teacher.py --workdir=runs/teacher_dual
  cpu    the LoopITR recipe (configs/loopitr.py:scratch, random init) for 4000 steps: dual towers + a cross encoder
         (match_scores = ITM positive logit), the MCAD / CPRD cross teacher. Hours on a 2-core CPU.
         python -m jaxdistill.main --config=configs/teacher.py:cpu --workdir=runs/teacher
  dual_minilm  the `dual` teacher with the whole pretrained MiniLM-L6 as its text tower (6
         layers, mean pooling, its WordPiece; config.init_from) and the 256-wide 4-layer ViT,
         ITC for 900 steps: the dual teacher built as the pretrained students are (issue 12;
         not trained on this benchmark yet, so no figures in docs/teachers.md)
         python -m jaxdistill.main --config=configs/teacher.py:dual_minilm --workdir=runs/teacher_dual_minilm
  short  the LoopITR teacher for 600 steps
  cross  a cross teacher on trained towers: the LoopITR network whose dual part starts from the
         `dual` preset's run (config.init_from: workdir runs/teacher_dual), trained for 300 steps
         with ITC + ITM (hard negatives from the trained towers) + MLM and no distillation into
         the towers
         python -m jaxdistill.main --config=configs/teacher.py:cross --workdir=runs/teacher_cross
  tiny   seconds; tests
"""

import os

import ml_collections

from jaxdistill.config import load_config_file
from jaxdistill.pretrained import tower_configs

HERE = os.path.dirname(os.path.abspath(__file__))
dual = lambda preset: load_config_file(os.path.join(HERE, f"dual.py:{preset}"))
loopitr = lambda preset: load_config_file(os.path.join(HERE, f"loopitr.py:{preset}"))

PRESETS = ("tiny", "dual", "dual_minilm", "short", "cpu", "cross")


def _widen(m: ml_collections.ConfigDict) -> None:
  m.vision_width = m.text_width = m.cross_width = 256
  m.vision_layers = m.text_layers = m.cross_layers = 4
  m.vision_heads = m.text_heads = m.cross_heads = 8
  m.vision_mlp = m.text_mlp = m.cross_mlp = 512
  m.embed_dim = 256


def get_config(preset: str = "dual") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown teacher preset {preset!r}: use one of {', '.join(PRESETS)} "
                     "(e.g. --config=configs/teacher.py:dual)")
  if preset == "tiny":
    return loopitr("tiny")
  if preset in ("dual", "dual_minilm"):
    config = dual("cpu")
    _widen(config.model)
    config.train.num_steps = 1500
    config.optim.warmup_steps = 100
    if preset == "dual_minilm":
      tower_configs.minilm(config, "student/", layers=6)   # text: all of MiniLM-L6, 384 wide
      config.train.num_steps, config.optim.warmup_steps = 900, 50
  elif preset == "cross":
    config = loopitr("scratch")
    _widen(config.model)
    config.train.num_steps = 300
    config.optim.warmup_steps = 30
    config.optim.learning_rate = 1e-4          # the towers are trained already
    config.init_from = ({"source": "workdir:runs/teacher_dual",     # the dual preset's run
                         "mapping": (("student/dual/", "student/"),)},)
    config.loopitr.itc_only_steps = 0
    config.loopitr.distill_negatives = "none"   # no cross -> dual distillation (3B cross pairs/step, not 9B)
  else:
    config = loopitr("scratch")
    _widen(config.model)
    config.train.num_steps = 4000 if preset == "cpu" else 600
    config.optim.warmup_steps = 200 if preset == "cpu" else 50
    config.loopitr.itc_only_steps = config.train.num_steps // 3   # as the cpu student (configs/loopitr.py)
  config.train.checkpoint_every = 200
  return config
