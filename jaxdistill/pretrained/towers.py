"""`load_tower_params(path, architecture, layers)`: a pretrained checkpoint -> params in the
layout of a models/towers.py tower, for initialising a student from it ("init_from"; papers
000, 001, 004 start small students from pretrained encoders, optionally a subset of layers).

architecture: "bert" (a Hugging Face BertModel directory, e.g. MiniLM-L6, packaged.minilm_dir())
-> BertTower params {"bert": ...}; "efficientnet_lite0" (the port's state dict,
packaged.efficientnet_path()) -> EfficientNetTower params {"backbone": ...}, BatchNorm folded
into the convs and the ImageNet classifier dropped; "hf_vit" (a Hugging Face ViT / BEiT /
data2vec-vision directory, config.json model_type vit | beit | data2vec-vision) -> HFViTTower
params {"vit": ...}, the pooler dropped (the tower returns tokens).

info: {"architecture", "path", "layers" (kept original layer indices, or None),
"checkpoint_layers", "model"}; "model" holds the `model` config fields the params fix (the
tower kind and its widths), so a config can be checked against, or filled from, the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from jaxdistill.models.bert import Bert
from jaxdistill.models.efficientnet_lite import HEAD_WIDTH
from jaxdistill.models.hf_vit import ImageEncoder
from jaxdistill.pretrained import bert, efficientnet_lite, vit
from jaxdistill.pretrained.checkpoint import CheckpointError, layer_indices, read_config

TOWER_ARCHITECTURES = ("bert", "efficientnet_lite0", "hf_vit")


def _bert_model_fields(module: Bert) -> dict[str, Any]:
  """The `model` config fields of a BertTower with `module`'s sizes."""
  return dict(text_tower="bert", vocab_size=module.vocab_size, text_width=module.hidden_size,
              text_layers=module.num_layers, text_heads=module.num_heads,
              text_mlp=module.intermediate_size,
              bert_max_positions=module.max_position_embeddings,
              bert_type_vocab_size=module.type_vocab_size,
              bert_layer_norm_eps=module.layer_norm_eps, bert_hidden_act=module.hidden_act)


def bert_fields(path: str) -> dict[str, Any]:
  """The `model` config fields a BERT-family checkpoint's config.json fixes (text_tower "bert",
  vocabulary, widths, heads, its layer count, position / token-type rows, LN epsilon,
  activation), read without loading the weights; configs fill their model section from it."""
  return _bert_model_fields(bert.from_config(read_config(path)))


def _bert(path: str, layers: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
  config = read_config(path)
  module, params = bert.load(path, config, layers=layers)
  info = dict(layers=None if layers is None else layer_indices(layers,
                                                               config["num_hidden_layers"]),
              checkpoint_layers=config["num_hidden_layers"],
              model=_bert_model_fields(module))
  return {"bert": params}, info


def _efficientnet(path: str, layers: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
  if layers is not None:
    raise CheckpointError(f"layer selection {layers!r} does not apply to efficientnet_lite0 (its "
                          "MBConv stages are fixed): leave the layer selection unset")
  _, variables = efficientnet_lite.load(path)
  params = efficientnet_lite.fold_batch_norm(variables)
  del params["classifier"]
  info = dict(layers=None, checkpoint_layers=None,
              model=dict(image_tower="efficientnet_lite0", vision_width=HEAD_WIDTH))
  return {"backbone": params}, info


def _hf_vit_model_fields(module: ImageEncoder, path: str, channels: int) -> dict[str, Any]:
  """The `model` config fields of an HFViTTower holding `module` (checkpoint at `path`)."""
  mean, std = vit.image_normalization(path, channels)
  return dict(image_tower="hf_vit", vision_width=module.hidden_size,
              vision_layers=module.num_layers, vision_heads=module.num_heads,
              vision_mlp=module.mlp_dim, hf_vit_image_size=module.image_size,
              hf_vit_channels=channels, hf_vit_patch_size=module.patch_size,
              hf_vit_image_mean=mean, hf_vit_image_std=std, hf_vit_qkv_bias=module.qkv_bias,
              hf_vit_layer_scale=module.layer_scale_init,
              hf_vit_absolute_positions=module.absolute_positions,
              hf_vit_relative_positions=module.relative_positions,
              hf_vit_activation=module.activation, hf_vit_layer_norm_eps=module.layer_norm_eps,
              hf_vit_final_norm=module.final_norm)


def hf_vit_fields(path: str) -> dict[str, Any]:
  """The `model` config fields a ViT / BEiT / data2vec-vision checkpoint fixes (image_tower
  "hf_vit", widths, heads, its layer count, the hf_vit_* options and input normalisation), read
  from config.json and preprocessor_config.json without loading the weights."""
  config = read_config(path)
  module = vit.image_encoder_from_config(config, {})
  return _hf_vit_model_fields(module, path, config.get("num_channels", 3))


def _hf_vit(path: str, layers: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
  config = read_config(path)
  module, params = vit.load(path, config, layers=layers)
  total = config.get("num_hidden_layers", 12)
  params = {k: v for k, v in params.items() if k not in ("pooler", "pool_norm")}
  info = dict(layers=None if layers is None else layer_indices(layers, total),
              checkpoint_layers=total,
              model=_hf_vit_model_fields(module, path, config.get("num_channels", 3)))
  return {"vit": params}, info


_LOADERS = {"bert": _bert, "efficientnet_lite0": _efficientnet, "hf_vit": _hf_vit}


def load_tower_params(path: str, architecture: str, layers: str | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Checkpoint at `path` -> (params of the `architecture` tower, info); layers: None (all) |
  "first:N" | "last:N" | "i,j,k", renumbered 0..n-1 (checkpoint.layer_indices). Any bad path,
  architecture or selection raises one CheckpointError naming it and the fix."""
  path = os.fspath(path)
  if architecture not in _LOADERS:
    raise CheckpointError(f"unknown tower architecture {architecture!r} for {path}: use one of "
                          f"{', '.join(TOWER_ARCHITECTURES)}")
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path does not exist: {path}; pass the {architecture} "
                          "checkpoint (a Hugging Face model directory or a .safetensors/.pth file)")
  params, info = _LOADERS[architecture](path, layers)
  return params, dict(architecture=architecture, path=path, **info)
