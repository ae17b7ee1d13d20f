r"""Larger networks trained on the bundled benchmark, to serve as frozen teachers
(jaxdistill/teachers/workdir.py `from_workdir`). Use one as
  --config.teachers.<name>.kind=workdir --config.teachers.<name>.path=runs/teacher_dual

The pretrained presets (`towers`, then `cross`) are the benchmark's teachers since issue 12;
the others widen all towers to 256 and deepen them to 4 layers (8 heads, MLP 512, embedding
256: 6.3x the random-init cpu student's tower params). Presets (on top of jaxdistill/config.py's):
  dual   (default) the dual-encoder ITC recipe (configs/dual.py) for 1500 steps at batch 128:
         a dual teacher (embed_images / embed_texts; no cross encoder). 20-34 min on an idle 2-core CPU.
         python -m jaxdistill.main --config=configs/teacher.py --workdir=runs/teacher_dual
  cpu    the LoopITR recipe (configs/loopitr.py:scratch, random init) for 4000 steps: dual towers + a cross encoder
         (match_scores = ITM log-odds), a random-init cross teacher. Hours on a 2-core CPU.
         python -m jaxdistill.main --config=configs/teacher.py:cpu --workdir=runs/teacher
  dual_minilm  the `dual` teacher with the whole pretrained MiniLM-L6 as its text tower (6
         layers, mean pooling, its WordPiece; config.init_from) and the 256-wide 4-layer ViT,
         ITC for 900 steps: the dual teacher built as the pretrained students are (issue 12;
         not trained on this benchmark yet, so no figures in docs/teachers.md)
         python -m jaxdistill.main --config=configs/teacher.py:dual_minilm --workdir=runs/teacher_dual_minilm
  short  the LoopITR teacher for 600 steps
  towers the pretrained towers after ITC alone: configs/loopitr.py (MiniLM-L6's first 3 layers,
         mean pooling, + the cpu ViT) with all 410 steps ITC-only; test R@sum 521.6, binding
         95.1% (the 15-minute student's level, not above it). ~12 min here.
         python -m jaxdistill.main --config=configs/teacher.py:towers --workdir=runs/loopitr_itc
  cross  (the benchmark's cross teacher) configs/loopitr_long.py:cross_positions: a 2-layer
         prenorm cross encoder with a learnt position per image token, ITM alone for 4000 steps
         on runs/loopitr_itc's frozen towers; re-ranking its dual top 4 lifts test t2i R@1
         from 72.0 to 78.9 / 78.6 (seeds 0 / 1), cross binding 97.9 / 97.6% (docs/results.md).
         ~30-40 min here. The CPRD cross-teacher rows (configs/cprd.py:pretrained) and MCAD
         (configs/mcad.py, `towers` its dual stream) read it.
         python -m jaxdistill.main --config=configs/teacher.py:cross --workdir=runs/cross_positions_s0
  cross_on_dual  the cross teacher before issue 12: the LoopITR network whose dual part starts
         from the `dual` preset's run (config.init_from: workdir runs/teacher_dual), 300 steps of
         ITC + ITM (hard negatives from the trained towers) + MLM, no distillation into the
         towers; its ITM stays at the label prior (docs/teachers.md)
         python -m jaxdistill.main --config=configs/teacher.py:cross_on_dual --workdir=runs/teacher_cross
  tiny   seconds; tests
"""

import os

import ml_collections

from jaxdistill.config import load_config_file
from jaxdistill.pretrained import tower_configs

HERE = os.path.dirname(os.path.abspath(__file__))
dual = lambda preset: load_config_file(os.path.join(HERE, f"dual.py:{preset}"))
loopitr = lambda preset: load_config_file(os.path.join(HERE, f"loopitr.py:{preset}"))

PRESETS = ("tiny", "dual", "dual_minilm", "short", "cpu", "towers", "cross", "cross_on_dual")


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
  if preset == "towers":
    config = loopitr("cpu")
    config.loopitr.itc_only_steps = config.train.num_steps
    return config
  if preset == "cross":
    return load_config_file(os.path.join(HERE, "loopitr_long.py:cross_positions"))
  if preset in ("dual", "dual_minilm"):
    config = dual("cpu")
    _widen(config.model)
    config.train.num_steps = 1500
    config.optim.warmup_steps = 100
    if preset == "dual_minilm":
      tower_configs.minilm(config, "student/", layers=6)   # text: all of MiniLM-L6, 384 wide
      config.train.num_steps, config.optim.warmup_steps = 900, 50
  elif preset == "cross_on_dual":
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
