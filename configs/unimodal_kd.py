r"""Paper 004: retrieval from pretrained unimodal towers + a shared layer, with self-supervised KD.

  python -m jaxdistill.main --config=configs/ssl_vit.py --mode=pretrain_image --workdir=runs/ssl_vit
  python -m jaxdistill.main --config=configs/unimodal_kd.py --workdir=runs/unimodal_kd
  python -m jaxdistill.main --config=configs/unimodal_kd.py:cpu,no_kd --workdir=runs/ukd_no_kd

The first command trains the self-supervised image backbone (DINO on Fashion-MNIST's 60,000
train images, docs/unimodal_kd.md): its first N layers start the student's image tower, the
whole network is the KD teacher (config.teachers.ssl). Nothing vision-language is pretrained.

Argument: PRESET[,ABLATION][,ssl=WORKDIR]
  PRESET    cpu (default) | tiny (tests: seconds)
  ABLATION  full (default) | no_kd (L_cl only; no teacher) | no_bank (KD without the memory
            bank) | every_second (layers 0, 2, 4 of both towers instead of the first 3) |
            random_init (both towers randomly initialised, KD kept) | mean (mean-pooled text
            readout of the shared layer instead of [CLS])
  ssl=WORKDIR  the configs/ssl_vit.py run that starts the image tower and is the KD teacher
            (default runs/ssl_vit; tiny: a run of width 384 like MiniLM's)
  Bank sizes: --config.unimodal_kd.bank_size=N (0 = no bank).
Student (§3.2): image tower = the SSL ViT's first 3 of 6 layers; text tower = MiniLM-L6's first
3 of 6 layers (paper: 6 of 12 for Data2Vec2 / BERT-base: half of each); one randomly
initialised shared pre-LN layer (width 384, 6 heads); [CLS] readouts, no projection.
"""

import ml_collections

from jaxdistill import config as base_config
from jaxdistill.config import teacher_section
from jaxdistill.pretrained import tower_configs

PRESETS = ("tiny", "cpu")
ABLATIONS = ("full", "no_kd", "no_bank", "every_second", "random_init", "mean")
SSL_WORKDIR = "runs/ssl_vit"


def _parse(arg: str) -> tuple[str, str, str]:
  tokens = [t.strip() for t in arg.split(",") if t.strip()]
  ssl = [t.partition("=")[2] for t in tokens if t.startswith("ssl=")]
  tokens = [t for t in tokens if not t.startswith("ssl=")] or ["cpu"]
  preset, ablation = tokens[0], (tokens[1] if len(tokens) > 1 else "full")
  if preset not in PRESETS or ablation not in ABLATIONS or len(tokens) > 2 or len(ssl) > 1:
    raise ValueError(f"configs/unimodal_kd.py:{arg}: use PRESET[,ABLATION][,ssl=WORKDIR] with "
                     f"PRESET one of {', '.join(PRESETS)} and ABLATION one of {', '.join(ABLATIONS)}")
  return preset, ablation, (ssl[0] if ssl else SSL_WORKDIR)


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  preset, ablation, ssl_workdir = _parse(arg)
  tiny = preset == "tiny"
  config = base_config.base_config(preset)
  config.method = "unimodal_kd"
  config.ablation = ablation
  layers = {"every_second": "0,2,4"}.get(ablation, "first:1" if tiny else "first:3")
  tower_configs.minilm_layers(config, "student/", layers)
  tower_configs.ssl_vit(config, "student/", ssl_workdir, layers)
  if ablation == "random_init":
    config.init_from = ()
  m = config.model
  m.shared_layers, m.shared_heads, m.shared_mlp = 1, 6, 1536   # §3.2: one ViT layer, D = 384
  m.project, m.embed_dim, m.image_pool = False, m.text_width, "cls"       # §3.3
  m.text_pool = "mean" if ablation == "mean" else "cls"
  config.teachers.ssl = teacher_section("workdir", ssl_workdir)   # the whole SSL ViT

  u = config.unimodal_kd = ml_collections.ConfigDict()
  u.kd_weight = 0.0 if ablation == "no_kd" else 1.0   # L = L_cl + L_kd (§3.4)
  # Paper: 65,536 teacher features (CC12M, 12M images). The benchmark has 8,000 train images, so
  # a bank that size would hold each one 8 times; 4,096 is half an epoch of distinct images.
  u.bank_size = 0 if ablation == "no_bank" else (64 if tiny else 4096)
  u.kd_temperature = 0.07                             # MoCo's; the paper gives none
  config.train.num_steps = 8 if tiny else 600
  config.optim.warmup_steps = max(config.train.num_steps // 10, 1)   # §3.5: 10% of the steps
  return config
