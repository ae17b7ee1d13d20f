r"""A larger LoopITR network trained on the bundled benchmark, to serve as a frozen teacher:
its dual towers are the dual teacher and its cross encoder (ITM positive logit) the cross teacher
(jaxdistill/teachers/loopitr.py; issue 3 part 5a). Use it as
  --config.teacher.kind=loopitr_workdir --config.teacher.path=runs/teacher

Presets (on top of jaxdistill/config.py's):
  cpu    (default) 256 wide, 4 layers per tower, 4000 steps: hours on a 2-core CPU
         python -m jaxdistill.main --config=configs/teacher.py --workdir=runs/teacher
  short  the same network for 600 steps (what fits a shared CPU in ~20 minutes is less: see
         docs/teachers.md for what was run)
  tiny   seconds; tests
"""

import ml_collections

from configs import loopitr

PRESETS = ("tiny", "short", "cpu")


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown teacher preset {preset!r}: use one of {', '.join(PRESETS)} "
                     "(e.g. --config=configs/teacher.py:cpu)")
  config = loopitr.get_config("tiny" if preset == "tiny" else "cpu")
  if preset == "tiny":
    return config
  m = config.model
  m.vision_width = m.text_width = m.cross_width = 256
  m.vision_layers = m.text_layers = m.cross_layers = 4
  m.vision_heads = m.text_heads = m.cross_heads = 8
  m.vision_mlp = m.text_mlp = m.cross_mlp = 512
  m.embed_dim = 256
  config.train.num_steps = 4000 if preset == "cpu" else 600
  config.train.checkpoint_every = 200
  config.optim.warmup_steps = 200 if preset == "cpu" else 50
  config.loopitr.itc_only_steps = config.train.num_steps // 3   # as the cpu student (configs/loopitr.py)
  return config
