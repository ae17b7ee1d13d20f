"""Config helpers: a tower of the `model` section started from the weights pip packages ship
(packaged.py), as data (model fields + one `config.init_from` entry; train/init.py loads it).

  efficientnet_lite0(config, prefix, input_size)  image tower = ImageNet EfficientNet-Lite0
  minilm(config, prefix, layers)                  text tower = MiniLM-L6's first `layers` layers,
                                                  mean pooling, its WordPiece tokenizer

prefix: where the network keeps its towers in the params of the "student" module,
"student/" for model.kind=dual (DualEncoder), "student/dual/" for loopitr. Used by
configs/mcad.py:mobile; the same fields as configs/lit_teacher.py and configs/loopitr.py use.
"""

from __future__ import annotations

import ml_collections

from jaxdistill.pretrained.packaged import efficientnet_path, minilm_dir
from jaxdistill.pretrained.towers import bert_fields

MINILM_MAX_LEN = 36   # MiniLM tokens of the benchmark's longest caption ([CLS] ... [SEP])


def efficientnet_lite0(config: ml_collections.ConfigDict, prefix: str, input_size: int) -> None:
  """Image tower = EfficientNet-Lite0 (ImageNet, BatchNorm folded), the benchmark image resized
  to input_size x input_size (models/towers.py EfficientNetTower; head map input_size / 32)."""
  m = config.model
  m.image_tower, m.vision_width, m.efficientnet_input_size = "efficientnet_lite0", 1280, input_size
  config.init_from = tuple(config.init_from) + (
      {"source": f"pretrained:{efficientnet_path()}", "architecture": "efficientnet_lite0",
       "layers": "", "mapping": ((f"{prefix}image_encoder/", ""),)},)


def minilm(config: ml_collections.ConfigDict, prefix: str, layers: int) -> None:
  """Text tower = the embeddings and first `layers` layers of MiniLM-L6 (all-MiniLM-L6-v2),
  mean pooling (what it was trained for), its tokenizer; max_len = MINILM_MAX_LEN."""
  path, m = minilm_dir(), config.model
  m.update(bert_fields(path))
  m.text_layers, m.text_pool, m.max_len = layers, "mean", MINILM_MAX_LEN
  config.data.tokenizer = path
  config.init_from = tuple(config.init_from) + (
      {"source": f"pretrained:{path}", "architecture": "bert", "layers": f"first:{layers}",
       "mapping": ((f"{prefix}text_encoder/", ""),)},)
