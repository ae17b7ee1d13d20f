r"""DINO self-supervised pretraining of the ViT image backbone of paper 004 (issue 15) on random
2x2 grids of the 60,000 Fashion-MNIST train images (docs/ssl_vit.md):

  python -m jaxdistill.main --config=configs/ssl_vit.py --mode=pretrain_image --workdir=runs/ssl_vit

Presets: --config=configs/ssl_vit.py:tiny (seconds, tests), :cpu (the default, ~20 min on 2 CPU
cores). The run's checkpoint holds {"student": the image network, "head": DINO's head}; another
run starts its ViT from the first N layers (+ the final LayerNorm) with
  config.init_from = ({"source": "workdir:runs/ssl_vit", "layers": "first:3",
                       "mapping": (("student/image_encoder/", "student/image_encoder/"),)},)
and `config.teachers.<name> = teacher_section("workdir", "runs/ssl_vit")` gives the full ViT
as a frozen image teacher (embed_images = its L2-normalised [CLS]). At the end of the run a linear
probe (evaluate/probe.py) writes <workdir>/probe.json.
"""

import ml_collections

from jaxdistill import config as base_config
from jaxdistill.pretrained import tower_configs

PRESETS = ("tiny", "cpu")


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise base_config.ConfigError(f"configs/ssl_vit.py has no preset {preset!r}: use one of "
                                  f"{', '.join(PRESETS)}")
  tiny = preset == "tiny"
  config = base_config.base_config(preset)
  config.method = "dino"

  m = config.model
  m.kind = "image"              # models/image.py: the image tower alone
  m.image_tower = "vit"
  m.patch_size = 28             # one token per grid cell: [CLS] + 4 cell tokens
  m.stem = "conv"
  m.dropout_rate = 0.0
  if tiny:
    m.vision_width, m.vision_layers, m.vision_heads, m.vision_mlp = 32, 2, 2, 64
  else:   # width 384 = MiniLM-L6's hidden size (paper 004's shared layer takes both towers)
    m.update(tower_configs.SSL_VIT)

  config.batch_size = 16 if tiny else 64   # grids per step (2 views each)

  d = config.dino = ml_collections.ConfigDict()
  d.head_hidden = 32 if tiny else 512          # DINO: 2048
  d.head_bottleneck = 16 if tiny else 128      # DINO: 256
  d.num_prototypes = 64 if tiny else 1024      # K; DINO: 65536
  d.student_temperature = 0.1                  # tau_s (paper)
  d.teacher_temperature = 0.04                 # tau_t (paper; its warm-up 0.04 -> 0.07 is off)
  d.teacher_momentum = 0.996                   # constant (paper: cosine 0.996 -> 1)
  d.center_momentum = 0.9                      # m of the centre update (paper)
  d.empty_rate = 1.0 / 11.0                    # the benchmark's empty-cell rate
  d.augment_max_shift = 3                      # pixels, per cell, zero fill
  d.augment_zoom = 0.15                        # per-cell scale factor in 1 +- zoom (bilinear)
  d.augment_flip = 0.5                         # per-cell horizontal flip probability
  d.augment_blur = 0.0                         # per-cell Gaussian blur probability
  d.augment_blur_sigma = 1.0                   # its sigma ~ U[0.1, this] pixels
  d.augment_solarize = 0.0                     # per-cell solarisation probability
  d.augment_gain = 0.3                         # intensity x U[0.7, 1.3] per cell
  d.augment_erase = 0.25                       # per-cell random-erasing probability
  d.augment_erase_min, d.augment_erase_max = 4, 12   # erased rectangle side, pixels
  d.augment_noise = 0.05                       # Gaussian pixel noise std (0..1 scale)

  o = config.optim   # DINO: AdamW, lr 5e-4 * batch / 256 after a linear warm-up, cosine to
  o.learning_rate = 5e-4 * config.batch_size / 256    # 1e-6, weight decay 0.04 (constant
  o.end_learning_rate = 1e-6                            # here; paper: cosine 0.04 -> 0.4),
  o.weight_decay = 0.04                                 # gradient clipping at 3.0
  o.grad_clip_norm = 3.0
  o.b1, o.b2 = 0.9, 0.999

  t = config.train
  t.num_steps = 6 if tiny else 1000
  o.warmup_steps = 2 if tiny else 100         # DINO: 10 of 100 epochs
  t.log_every = 1 if tiny else 10
  t.checkpoint_every = 2 if tiny else 100
  t.max_checkpoints = 2

  p = config.probe = ml_collections.ConfigDict()   # evaluate/probe.py, at the end of the run
  p.num_train = 256 if tiny else 10_000        # Fashion-MNIST train images the probe fits on
  p.num_test = 256 if tiny else 10_000         # test images it is scored on
  p.steps = 30 if tiny else 200                # L-BFGS steps (full batch)
  p.batch_size = 64 if tiny else 500           # feature extraction batch
  return config
