r"""LoopITR (paper 003): dual + cross encoder in one network, online distillation.

Run (CPU default, <= 15 minutes on 2 cores, bundled compositional Fashion-MNIST benchmark):
  python -m jaxdistill.main --config=configs/loopitr.py --workdir=runs/loopitr
Presets (--config=configs/loopitr.py:<preset>):
  cpu      (default) built as paper 003 §4 builds it, from pretrained weights (config.init_from),
           trained with its fine-tuning objective (ITC + ITM + distillation, no MLM):
           text tower = the first 3 layers of MiniLM-L6 (all-MiniLM-L6-v2, mean pooling, its
           WordPiece), cross encoder = its last 3 layers with new cross-attention, image tower =
           the small ViT of the cpu preset (random init; chosen over EfficientNet-Lite0 on val,
           docs/results.md)
  cpu_efficientnet  the same with the ImageNet EfficientNet-Lite0 image tower (2x2 head map at
           64 px input: one token per grid cell)
  scratch  every tower from random weights (the cpu preset before pretrained initialisation)
  tiny     seconds; tests and smoke runs      paper  ViT-B/16 + 6-layer text + 6-layer cross, §4.1
Ablations (paper 003 Tables 1-6), e.g.:
  --config.loopitr.num_negatives=1            (Table 1: m in 1, 4, 9, 14, 31)
  --config.loopitr.negative_sampling=random   (Table 2)
  --config.loopitr.distill_negatives=text     (Table 3: image | text | both | none)
  --config.loopitr.teacher=momentum           (Table 5: online | momentum | offline)
  --config.loopitr.teacher=offline --config.teachers.offline.path=runs/loopitr
  --config.loopitr.stop_gradient=False        (Table 6)
"""

import ml_collections

from jaxdistill import config as base_config
from jaxdistill.models.bert import CHECKPOINT_SUBLAYERS
from jaxdistill.pretrained import tower_configs
from jaxdistill.pretrained.packaged import minilm_dir
from jaxdistill.pretrained.towers import bert_fields

PRESETS = ("tiny", "cpu", "cpu_efficientnet", "scratch", "paper")


def from_pretrained_halves(config: ml_collections.ConfigDict, path: str) -> None:
  """Paper 003 §4 / ALBEF on a BERT-family checkpoint at `path`: text tower = its first half
  (embeddings + layers [0, n/2)), cross encoder = its second half (layers [n/2, n)) with new
  cross-attention sub-layers, its tokenizer, mean pooling (what sentence-transformers' MiniLM
  was trained for: its [CLS] output is nearly constant, docs/results.md)."""
  m = config.model
  m.update(bert_fields(path))
  half = m.text_layers // 2
  m.text_layers = m.cross_layers = half
  m.cross_encoder, m.text_pool = "bert", "mean"
  m.cross_width, m.cross_heads, m.cross_mlp = m.text_width, m.text_heads, m.text_mlp
  m.max_len = tower_configs.MINILM_MAX_LEN          # MiniLM tokens of the longest caption
  config.data.tokenizer = path
  config.init_from = tuple(config.init_from) + (
      {"source": f"pretrained:{path}", "architecture": "bert", "layers": f"first:{half}",
       "mapping": (("student/dual/text_encoder/", ""),)},
      {"source": f"pretrained:{path}", "architecture": "bert", "layers": f"last:{half}",
       "mapping": ((f"student/cross/(?=layer_\\d+/({CHECKPOINT_SUBLAYERS})/)", "bert/"),)},
  )


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown loopitr preset {preset!r}: use one of {', '.join(PRESETS)} "
                     "(e.g. --config=configs/loopitr.py:cpu)")
  pretrained = preset in ("cpu", "cpu_efficientnet")
  config = base_config.base_config("cpu" if preset in ("cpu", "cpu_efficientnet", "scratch")
                                   else preset)
  config.method = "loopitr"
  config.model.kind = "loopitr"
  config.model.cross_encoder = "prenorm"   # prenorm (models/cross.py) | bert | single_stream (models/bert.py)
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
  # ITC-only warm-up before ITM/MLM/distillation start (not in the paper); a weight of 0 skips
  # a term's work (methods/loopitr.py).
  lp.itc_only_steps = 200 if preset == "scratch" else 0
  if pretrained:
    from_pretrained_halves(config, minilm_dir())
    # 2 CPU cores: an ITC step takes ~1.4 s, a joint step with m=1 ~6 s (the cross encoder is
    # 3 MiniLM layers over 3B pairs; ~10 s with MLM) and re-ranking the top 4 ~1.5 min, so the 15-minute
    # budget is 395 ITC-only steps (where binding is learnt) and a token joint phase of 15 steps;
    # configs/loopitr_long.py has the paper's joint phase (docs/results.md).
    config.train.num_steps, lp.itc_only_steps = 410, 395
    lp.num_negatives = 1             # Table 1's m=1: a third of m=4's cross-encoder pairs
    # Training on a retrieval set from pretrained towers is paper 003's fine-tuning stage (§4.1,
    # supplement: ITC + ITM + distillation; MLM is a pre-training loss, §3). all-MiniLM-L6-v2
    # ships no MLM head either: a new one starts at ln V = 10.3, and its gradient through the
    # shared towers cost the dual encoder 2.9 val R@sum in 10 joint steps (docs/results.md).
    lp.mlm_weight = 0.0
    config.eval.rerank_k = 4
    if preset == "cpu_efficientnet":
      tower_configs.efficientnet_lite0(config, "student/dual/", input_size=64)
  return config
