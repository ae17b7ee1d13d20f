r"""Paper 004: retrieval from pretrained unimodal towers + a shared layer, with self-supervised KD.

  python -m jaxdistill.main --config=configs/ssl_vit.py --mode=pretrain_image --workdir=runs/ssl_vit
  python -m jaxdistill.main --config=configs/unimodal_kd.py --workdir=runs/unimodal_kd
  python -m jaxdistill.main --config=configs/unimodal_kd.py:cpu,no_kd --workdir=runs/ukd_no_kd
  python -m jaxdistill.main --config=configs/unimodal_kd.py:cpu,full,image=BEIT_DIR,text=BERT_DIR \
      --workdir=runs/ukd_beit_bert

The first command trains the self-supervised image backbone (DINO on Fashion-MNIST's 60,000
train images, docs/unimodal_kd.md): its first N layers start the student's image tower, the
whole network is the KD teacher (config.teachers.ssl). Nothing vision-language is pretrained.
The last uses real checkpoints instead (docs/unimodal_kd.md "Real checkpoints").

Argument: PRESET[,ABLATION][,ssl=WORKDIR | ,image=DIR][,text=DIR]
  PRESET    cpu (default) | tiny (tests: seconds)
  ABLATION  full (default) | no_kd (L_cl only; no teacher) | no_bank (KD without the memory
            bank) | every_second (layers 0, 2, 4, ... of both towers instead of the first half) |
            random_init (both towers randomly initialised, KD kept) | mean (mean-pooled text
            readout of the shared layer instead of [CLS])
  ssl=WORKDIR  the configs/ssl_vit.py run that starts the image tower and is the KD teacher
            (default runs/ssl_vit; tiny: a run of width 384 like MiniLM's)
  image=DIR  a Hugging Face ViT / BEiT / data2vec-vision directory instead: the image tower is
            its first layers (models/towers.py "hf_vit", the benchmark image resized and
            normalised to its input), the KD teacher the whole checkpoint's [CLS] (kind pretrained)
  text=DIR  a Hugging Face BERT directory (weights + tokenizer.json) instead of the packaged
            MiniLM-L6; the shared layer needs both towers of one width
  Bank sizes: --config.unimodal_kd.bank_size=N (0 = no bank).
Student (§3.2): each tower = the first half of its pretrained layers (SSL ViT, MiniLM-L6: 3 of 6;
the paper: 6 of 12 for Data2Vec2 / BERT-base; tiny: 1); one randomly initialised shared pre-LN
layer of the image tower's heads and MLP (width 384, 6 heads for the defaults); [CLS] readouts,
no projection.
"""

import ml_collections

from jaxdistill import config as base_config
from jaxdistill.config import ConfigError, teacher_section
from jaxdistill.pretrained import tower_configs
from jaxdistill.pretrained.packaged import minilm_dir

PRESETS = ("tiny", "cpu")
ABLATIONS = ("full", "no_kd", "no_bank", "every_second", "random_init", "mean")
SSL_WORKDIR = "runs/ssl_vit"
PATHS = ("ssl", "image", "text")   # the NAME=PATH tokens of the argument
USAGE = "PRESET[,ABLATION][,ssl=WORKDIR | ,image=DIR][,text=DIR]"


def _parse(arg: str) -> tuple[str, str, dict[str, str]]:
  """-> (preset, ablation, {"ssl" | "image" | "text": path})."""
  tokens = [t.strip() for t in arg.split(",") if t.strip()]
  named = [t.partition("=") for t in tokens if "=" in t]
  paths = {name.strip(): path.strip() for name, _, path in named}
  tokens = [t for t in tokens if "=" not in t] or ["cpu"]
  preset, ablation = tokens[0], (tokens[1] if len(tokens) > 1 else "full")
  if (preset not in PRESETS or ablation not in ABLATIONS or len(tokens) > 2
      or len(paths) < len(named) or not set(paths) <= set(PATHS) or not all(paths.values())
      or {"ssl", "image"} <= set(paths)):
    raise ConfigError(f"configs/unimodal_kd.py:{arg}: use {USAGE} with PRESET one of "
                      f"{', '.join(PRESETS)}, ABLATION one of {', '.join(ABLATIONS)}, each path "
                      "at most once and ssl= or image= (not both)")
  return preset, ablation, paths


def _layers(ablation: str, tiny: bool, total: int) -> str:
  """A tower's layer selection out of `total`: the first half (tiny: 1), or every second."""
  if ablation == "every_second":
    return ",".join(str(i) for i in range(0, total, 2))
  return "first:1" if tiny else f"first:{total // 2}"


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  preset, ablation, paths = _parse(arg)
  tiny = preset == "tiny"
  config = base_config.base_config(preset)
  config.method = "unimodal_kd"
  config.ablation = ablation
  text = paths.get("text", "") or minilm_dir()
  tower_configs.bert_layers(config, "student/", text,
                            _layers(ablation, tiny, tower_configs.checkpoint_layers(text)))
  if "image" in paths:
    image = paths["image"]
    tower_configs.hf_vit(config, "student/", image,
                         _layers(ablation, tiny, tower_configs.checkpoint_layers(image)))
    config.teachers.ssl = teacher_section("pretrained", image)   # the whole checkpoint's [CLS]
  else:
    ssl_workdir = paths.get("ssl", SSL_WORKDIR)
    tower_configs.ssl_vit(config, "student/", ssl_workdir,
                          _layers(ablation, tiny, tower_configs.SSL_VIT["vision_layers"]))
    config.teachers.ssl = teacher_section("workdir", ssl_workdir)   # the whole SSL ViT
  if ablation == "random_init":
    config.init_from = ()
  m = config.model
  if m.vision_width != m.text_width:
    raise ConfigError(
        f"configs/unimodal_kd.py:{arg}: the shared layer reads both towers' tokens, so they need "
        f"one width, but the image tower ({paths.get('image', 'the SSL ViT')}) is "
        f"{m.vision_width} wide and the text tower ({text}) {m.text_width}: pick an image and a "
        "text checkpoint of one hidden size (e.g. BEiT-base and BERT-base, 768)")
  m.shared_layers = 1                                   # §3.2: one ViT layer, D = the towers'
  m.shared_heads, m.shared_mlp = m.vision_heads, m.vision_mlp
  m.project, m.embed_dim, m.image_pool = False, m.text_width, "cls"       # §3.3
  m.text_pool = "mean" if ablation == "mean" else "cls"

  u = config.unimodal_kd = ml_collections.ConfigDict()
  u.kd_weight = 0.0 if ablation == "no_kd" else 1.0   # L = L_cl + L_kd (§3.4)
  # Paper: 65,536 teacher features (CC12M, 12M images). The benchmark has 8,000 train images, so
  # a bank that size would hold each one 8 times; 4,096 is half an epoch of distinct images.
  u.bank_size = 0 if ablation == "no_bank" else (64 if tiny else 4096)
  u.kd_temperature = 0.07                             # MoCo's; the paper gives none
  config.train.num_steps = 8 if tiny else 600
  config.optim.warmup_steps = max(config.train.num_steps // 10, 1)   # §3.5: 10% of the steps
  return config
