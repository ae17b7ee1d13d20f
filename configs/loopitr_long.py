r"""LoopITR beyond the 15-minute CPU budget (issue 12 deliver 3): the cpu preset of
configs/loopitr.py (MiniLM halves, small ViT) with a joint phase long enough for the cross
encoder to learn, and the levers tried to make it earn its place, one preset each. Results,
commands and times: docs/results.md. On a GPU each preset takes minutes; on 2 CPU cores hours.

  python -m jaxdistill.main --config=configs/loopitr_long.py:<preset> --workdir=runs/loopitr_<preset>
Presets:
  paper       400 ITC-only steps, then 2000 joint steps of paper 003's objective (m=4, hard
              negatives for ITM and distillation, MLM (the pre-training
              objective; the cpu preset drops it), distillation warmed up over one epoch)
  random_itm  ITM on random in-batch negatives (the easy half of an ITM curriculum; Table 8d)
  swap        look-alike groups of swaps only (data.swap_fraction=1: every batch holds captions
              that differ only in where items are)
  low_lr      pretrained layers (MiniLM's) at a third of the learning rate of the new ones
  itm_mean    the ITM head reads the mean of the fused caption tokens, not [CLS] (model.itm_pool)
  cross_only, cross_only_mean, cross_only_mixed   CPU probes (~8 min each): the cross encoder
              alone, 100 steps of ITM on trained towers that stay frozen (init_from the ITC-only
              run runs/loopitr_itc: configs/loopitr.py with --config.loopitr.itc_only_steps=410):
              the paper's hard negatives with a [CLS] or a mean-pooled ITM head, or each row's
              hard or random negative at 1/2 (loopitr.itm_negatives=mixed); evaluated on val
  cross_only_bert_init  the cross_only probe with the new cross-attention layers initialised
              as HF BERT initialises them (normal, std 0.02: model.cross_init_std)
  cross_only_gated  ... with a tanh gate starting at 0 on each cross-attention output
              (Flamingo; model.cross_gate): the caption stream has its say before the image
  cross_only_single_stream  ... with a single-stream cross encoder (caption + image tokens in
              one transformer, model.cross_encoder=single_stream) from the same MiniLM layers
  cross_only_low_lr  ... with the new layers at 3e-4 and the pretrained MiniLM layers at 1e-4
  cross_only_swap  ... on look-alike swap groups only (data.swap_fraction=1)
  cross_positions  the cross encoder that learns binding (chosen on val with
              experiments/cross_probe.py): the cross_only set-up (runs/loopitr_itc's trained
              towers, frozen; ITM alone on in-batch hard negatives) with a learnt position per
              image token (model.cross_image_positions: cross-attention is blind to token order
              and the ViT's cell tokens barely carry their cell), a 2-layer width-128 prenorm
              cross encoder from scratch, lr 1e-3, batch 64, 4000 steps; test split, re-ranks
              the dual top 4 (~40 min here)
  tiny        seconds; tests
"""

import os

import ml_collections

from jaxdistill.config import load_config_file
from jaxdistill.models.bert import CHECKPOINT_SUBLAYERS

PROBES = ("cross_only", "cross_only_mean", "cross_only_mixed", "cross_only_bert_init",
          "cross_only_gated", "cross_only_single_stream", "cross_only_low_lr", "cross_only_swap")
PRESETS = ("paper", "random_itm", "swap", "low_lr", "itm_mean") + PROBES + ("cross_positions",
                                                                             "tiny")
# Params that config.init_from fills from MiniLM (configs/loopitr.py from_pretrained_halves).
PRETRAINED = rf"student/(dual/text_encoder|cross/layer_\d+/({CHECKPOINT_SUBLAYERS}))/.*"
# Per probe, the cross-encoder params the towers' run does not have (they keep their init).
PROBE_NEW_PARAMS = {"cross_only_bert_init": r"cross/layer_\d+/crossattention",
                    "cross_only_gated": r"cross/layer_\d+/crossattention_gate",
                    "cross_only_single_stream": r"cross/image_"}


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown loopitr_long preset {preset!r}: use one of {', '.join(PRESETS)}")
  here = os.path.dirname(os.path.abspath(__file__))
  config = load_config_file(os.path.join(here, "loopitr.py:" + ("tiny" if preset == "tiny" else "cpu")))
  lp = config.loopitr
  if preset == "cross_positions":
    config.init_from = ({"source": "workdir:runs/loopitr_itc",
                         "mapping": (("student/dual/", "student/dual/"),)},)
    config.trainable = (("student/dual/.*", None), (".*", {}))   # towers (and tau) frozen
    m = config.model
    m.cross_encoder, m.cross_image_positions = "prenorm", 1.0
    m.cross_width, m.cross_layers, m.cross_heads, m.cross_mlp = 128, 2, 4, 512
    config.batch_size = 64
    config.train.num_steps, lp.itc_only_steps = 4000, 0
    config.optim.learning_rate, config.optim.warmup_steps = 1e-3, 50
    lp.distill_weight = 0.0                    # ITM alone trains the cross encoder
    config.eval.rerank_k = 4
    config.train.checkpoint_every = 500
    return config
  if preset.startswith("cross_only"):
    # Every param from the towers' run, except, with BERT-scale init, its LeCun-initialised
    # cross-attention copies.
    keep = f"(?!{PROBE_NEW_PARAMS[preset]})" if preset in PROBE_NEW_PARAMS else ""
    config.init_from = ({"source": "workdir:runs/loopitr_itc",
                         "mapping": ((f"student/{keep}", "student/"),)},)
    config.trainable = (("student/dual/.*", None), (".*", {}))   # towers (and tau) frozen
    config.train.num_steps, lp.itc_only_steps = 100, 0
    config.optim.learning_rate, config.optim.warmup_steps = 1e-4, 10
    lp.distill_weight = 0.0                    # ITM alone trains the cross encoder
    config.eval.split, config.eval.rerank_k = "val", 4
    config.model.itm_pool = "mean" if preset == "cross_only_mean" else "cls"
    if preset == "cross_only_mixed":
      lp.itm_negatives = "mixed"
    if preset == "cross_only_bert_init":
      config.model.cross_init_std = 0.02
    if preset == "cross_only_gated":
      config.model.cross_gate = True
    if preset == "cross_only_single_stream":
      config.model.cross_encoder = "single_stream"
    if preset == "cross_only_low_lr":
      config.optim.learning_rate = 3e-4
      config.trainable = (("student/dual/.*", None), (PRETRAINED, {"learning_rate": 1e-4}),
                          (".*", {}))
    if preset == "cross_only_swap":
      config.data.swap_fraction = 1.0
    return config
  if preset != "tiny":
    config.train.num_steps, lp.itc_only_steps = 2400, 400
    lp.num_negatives = 4                       # paper 003 Table 1
    config.eval.rerank_k = 16                  # paper 003 Table 13
    config.train.checkpoint_every = 400
    lp.mlm_weight = 1.0                        # paper 003's pre-training objective, with MLM
  if preset == "random_itm":
    lp.itm_negatives = "random"
  elif preset == "swap":
    config.data.swap_fraction = 1.0
  elif preset == "itm_mean":
    config.model.itm_pool = "mean"
  elif preset == "low_lr":
    config.trainable = ((PRETRAINED, {"learning_rate": config.optim.learning_rate / 3}),
                        (".*", {}))
  return config
