"""Config helpers: a tower of the `model` section started from pretrained weights (those pip
packages ship, packaged.py, or a local checkpoint), as data (model fields + one
`config.init_from` entry; train/init.py loads it).

  efficientnet_lite0(config, prefix, input_size)  image tower = ImageNet EfficientNet-Lite0
  minilm(config, prefix, layers)                  text tower = MiniLM-L6's first `layers` layers,
                                                  mean pooling, its WordPiece tokenizer
  bert_layers(config, prefix, path, layers)       text tower = layers of a HF BERT directory
                                                  (minilm_layers: of the packaged MiniLM-L6)
  hf_vit(config, prefix, path, layers)            image tower = layers of a HF ViT / BEiT /
                                                  data2vec-vision directory
  ssl_vit(config, prefix, workdir, layers)        image tower = layers of the self-supervised
                                                  ViT a configs/ssl_vit.py run trained

prefix: where the network keeps its towers in the params of the "student" module,
"student/" for model.kind=dual (DualEncoder), "student/dual/" for loopitr. Used by
configs/mcad.py:mobile; the same fields as configs/lit_teacher.py and configs/loopitr.py use.
"""

from __future__ import annotations

import os

import ml_collections

from jaxdistill.pretrained.checkpoint import CheckpointError, read_config
from jaxdistill.pretrained.packaged import efficientnet_path, minilm_dir
from jaxdistill.pretrained.towers import bert_fields, hf_vit_fields

# MiniLM tokens of the benchmark's longest caption ([CLS] ... [SEP]); MiniLM's WordPiece
# vocabulary is BERT-base-uncased's.
MINILM_MAX_LEN = 36


def efficientnet_lite0(config: ml_collections.ConfigDict, prefix: str, input_size: int) -> None:
  """Image tower = EfficientNet-Lite0 (ImageNet, BatchNorm folded), the benchmark image resized
  to input_size x input_size (models/towers.py EfficientNetTower; head map input_size / 32)."""
  m = config.model
  m.image_tower, m.vision_width, m.efficientnet_input_size = "efficientnet_lite0", 1280, input_size
  config.init_from = tuple(config.init_from) + (
      {"source": f"pretrained:{efficientnet_path()}", "architecture": "efficientnet_lite0",
       "layers": "", "mapping": ((f"{prefix}image_encoder/", ""),)},)


def bert_layers(config: ml_collections.ConfigDict, prefix: str, path: str, layers: str) -> None:
  """Text tower = the embeddings and the layers `layers` selects ("first:N" | "i,j,k") of the
  Hugging Face BERT directory `path` (config.json, weights, tokenizer.json), its tokenizer;
  max_len = MINILM_MAX_LEN (an uncased BERT WordPiece; raise model.max_len for another
  vocabulary); pooling left as the config has it."""
  _check_model_type(path, ("bert",), "a BERT")
  m = config.model
  m.update(bert_fields(path))
  m.text_layers, m.max_len = _count(layers, m.text_layers), MINILM_MAX_LEN
  config.data.tokenizer = path
  config.init_from = tuple(config.init_from) + (
      {"source": f"pretrained:{path}", "architecture": "bert", "layers": layers,
       "mapping": ((f"{prefix}text_encoder/", ""),)},)


def minilm_layers(config: ml_collections.ConfigDict, prefix: str, layers: str) -> None:
  """Text tower = MiniLM-L6's embeddings and the layers `layers` selects, its tokenizer
  (bert_layers of the packaged all-MiniLM-L6-v2)."""
  bert_layers(config, prefix, minilm_dir(), layers)


def hf_vit(config: ml_collections.ConfigDict, prefix: str, path: str, layers: str) -> None:
  """Image tower = the patch embedding, [CLS], positions, final LayerNorm and the layers
  `layers` selects ("first:N" | "i,j,k") of the Hugging Face ViT / BEiT / data2vec-vision
  directory `path` (models/towers.py "hf_vit"; the benchmark image adapted to its input)."""
  _check_model_type(path, ("vit", "beit", "data2vec-vision"), "a ViT / BEiT / data2vec-vision")
  m = config.model
  m.update(hf_vit_fields(path))
  m.vision_layers = _count(layers, m.vision_layers)
  config.init_from = tuple(config.init_from) + (
      {"source": f"pretrained:{path}", "architecture": "hf_vit", "layers": layers,
       "mapping": ((f"{prefix}image_encoder/", ""),)},)


def checkpoint_layers(path: str) -> int:
  """The transformer layer count of the Hugging Face directory `path` (its config.json)."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path} is not a Hugging Face model directory (no config.json): pass "
                          "a directory saved with save_pretrained()")
  return read_config(path).get("num_hidden_layers", 12)


def _check_model_type(path: str, types: tuple[str, ...], what: str) -> None:
  """`path` is a Hugging Face directory whose config.json names one of `types`."""
  checkpoint_layers(path)
  model_type = read_config(path).get("model_type")
  if model_type not in types:
    raise CheckpointError(f"{path} holds a {model_type!r} model (config.json model_type), not "
                          f"{what} one: pass {what} Hugging Face directory")


# The self-supervised ViT of configs/ssl_vit.py: width 384 = MiniLM-L6's hidden size, so that
# paper 004's shared layer reads both towers' tokens; one token per 28x28 grid cell.
SSL_VIT = dict(image_tower="vit", vision_width=384, vision_layers=6, vision_heads=6,
               vision_mlp=1536, patch_size=28, stem="conv")
SSL_VIT_PARAMS = "student/image_encoder/"   # where a configs/ssl_vit.py run keeps its ViT


def ssl_vit(config: ml_collections.ConfigDict, prefix: str, workdir: str, layers: str) -> None:
  """Image tower = the layers `layers` selects ("first:N" | "i,j,k") of the ViT a
  configs/ssl_vit.py run trained in `workdir` (its final LayerNorm kept), as an init_from entry."""
  config.model.update(SSL_VIT)
  config.model.vision_layers = _count(layers, SSL_VIT["vision_layers"])
  config.init_from = tuple(config.init_from) + (
      {"source": f"workdir:{workdir}", "layers": layers,
       "mapping": ((f"{prefix}image_encoder/", SSL_VIT_PARAMS),)},)


def _count(layers: str, total: int) -> int:
  """How many layers a selection keeps: "first:N" / "last:N" -> N, "i,j,k" -> 3, "" -> total."""
  if not layers:
    return total
  kind, _, n = layers.partition(":")
  return int(n) if kind in ("first", "last") else len(layers.split(","))


def minilm(config: ml_collections.ConfigDict, prefix: str, layers: int) -> None:
  """Text tower = the embeddings and first `layers` layers of MiniLM-L6 (all-MiniLM-L6-v2),
  mean pooling (what it was trained for), its tokenizer; max_len = MINILM_MAX_LEN."""
  minilm_layers(config, prefix, f"first:{layers}")
  config.model.text_pool = "mean"
