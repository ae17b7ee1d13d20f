"""A network from the `model` config section, its params and its apply functions (`Towers`).

`model.kind` names the family: "dual" (DualEncoder: image and text towers, projections,
temperature; the student of the dual, CPRD and LiT recipes), "loopitr" (LoopITRModel: the
dual encoder plus a cross encoder with ITM and MLM heads, paper 003 Fig. 3) or "image"
(ImageNetwork: the image tower alone, self-supervised pretraining, models/image.py; its Towers'
text functions raise ImageOnlyError). Eval, export, mining and teachers-from-a-workdir build a
run's network from its saved config with these functions alone: no recipe, no teacher, no data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.config import MODEL_DTYPES
from jaxdistill.errors import JaxDistillError
from jaxdistill.models.dual import DualEncoder
from jaxdistill.models.image import ImageNetwork, image_only_error
from jaxdistill.models.layers import Encoder
from jaxdistill.models.loopitr import LoopITRModel, build_model as build_loopitr
from jaxdistill.models.towers import image_tower, image_width, remat, text_tower

KINDS = ("dual", "loopitr", "image")


class ModelConfigError(JaxDistillError, ValueError):
  """A `model` config value that cannot build a network."""


def build_model(mc, dtype: str | None = None) -> nn.Module:
  """The network of `mc.kind` ("dual" | "loopitr" | "image"); dtype: computation dtype (params
  stay float32), default `mc.dtype` when present, else float32. `mc.remat` (default "none")
  rematerialises each transformer block of every tower (models/layers.remat_block); neither
  setting changes the params tree."""
  kind = mc.get("kind", "dual")
  if kind not in KINDS:
    raise ModelConfigError(f"--config.model.kind={kind!r} is unknown: use one of {', '.join(KINDS)}")
  dtype = dtype or mc.get("dtype", "float32")
  if dtype not in MODEL_DTYPES:
    raise ModelConfigError(f"model dtype {dtype!r} is not valid: use one of "
                           f"{', '.join(MODEL_DTYPES)}")
  if kind == "loopitr":
    return build_loopitr({**dict(mc), "dtype": dtype})   # its towers: models/towers.py
  d = jnp.dtype(dtype)
  if kind == "image":
    return ImageNetwork(image_tower(mc, d))   # models/image.py: the image tower alone
  return DualEncoder(image_tower(mc, d), text_tower(mc, d), mc.embed_dim,
                     image_pool=mc.image_pool, text_pool=mc.get("text_pool", "cls"),
                     temperature_init=mc.temperature_init, shared=shared_encoder(mc, d),
                     project=mc.get("project", True), dtype=d)


def shared_encoder(mc, dtype: Any) -> nn.Module | None:
  """Paper 004's shared encoder: mc.shared_layers (0 = none) randomly initialised pre-LN
  transformer layers (ViT layout, mc.shared_heads heads, MLP mc.shared_mlp) that both towers'
  tokens pass through; it needs towers of one width."""
  layers = mc.get("shared_layers", 0)
  if not layers:
    return None
  if image_width(mc) != mc.text_width:
    raise ModelConfigError(f"--config.model.shared_layers={layers} needs image and text tokens of "
                           f"one width, got {image_width(mc)} and {mc.text_width}: pick towers of "
                           "equal width")
  return Encoder(layers, mc.shared_heads, mc.shared_mlp, dropout_rate=mc.dropout_rate,
                 dtype=dtype, remat=remat(mc))


def init_params(model: nn.Module, mc, key: jax.Array) -> Any:
  """Every param of `model`, from one dummy image [1, S, S, C] and caption [1, max_len] of `mc`
  (an image-only network: the image alone)."""
  images = jnp.zeros((1, mc.image_size, mc.image_size, mc.channels), jnp.float32)
  if isinstance(model, ImageNetwork):
    return model.init(key, images)["params"]
  ids = jnp.zeros((1, mc.max_len), jnp.int32)
  return model.init(key, images, ids, jnp.ones_like(ids))["params"]


@dataclasses.dataclass(frozen=True)
class Towers:
  """A network's apply functions, params first (pure; jit them at the call site).

  embed_image(params, images [B,H,W,C]) -> (emb [B,E] unit-norm, tokens [B,M,Dv])
  embed_text(params, ids [B,L], mask [B,L]) -> (emb [B,E] unit-norm, tokens [B,L,Dt])
  temperature(params) -> [] (the ITC temperature tau)
  match_scores(params, image_tokens [P,M,Dv], text_tokens [P,L,Dt], text_mask [P,L]) -> [P]
    (the cross encoder's positive-class ITM logit), or None without a cross encoder.
  match_outputs(the same inputs) -> (ITM logits [P, 2] ([:, 0] = match), fused [CLS] [P, D]),
    or None without a cross encoder.
  Each of embed_image / embed_text takes keyword `rngs` ({"dropout": key}) to run in training
  mode (dropout on); without it the network is deterministic.
  """
  embed_image: Callable
  embed_text: Callable
  temperature: Callable
  match_scores: Callable | None
  match_outputs: Callable | None = None


def _apply(model: nn.Module, method):
  def fn(params, *inputs, rngs=None):
    return model.apply({"params": params}, *inputs, deterministic=rngs is None, rngs=rngs,
                       method=method)
  return fn


def towers(model: nn.Module) -> Towers:
  """The `Towers` of a network built by `build_model` (an image-only network: embed_text and
  temperature raise ImageOnlyError when called)."""
  cls = type(model)
  if isinstance(model, ImageNetwork):
    def no_text(*args, **kwargs):
      raise image_only_error("embed_text")

    def no_temperature(*args, **kwargs):
      raise image_only_error("temperature")

    return Towers(embed_image=_apply(model, cls.encode_image), embed_text=no_text,
                  temperature=no_temperature, match_scores=None)
  match = outputs = None
  if isinstance(model, LoopITRModel):
    both = _apply(model, LoopITRModel.match_outputs)
    outputs = lambda p, image_tokens, text_tokens, text_mask: both(
        p, text_tokens, text_mask, image_tokens)
    match = lambda p, image_tokens, text_tokens, text_mask: outputs(
        p, image_tokens, text_tokens, text_mask)[0][:, 0]
  return Towers(embed_image=_apply(model, cls.encode_image),
                embed_text=_apply(model, cls.encode_text),
                temperature=lambda p: model.apply({"params": p}, method=cls.temperature),
                match_scores=match, match_outputs=outputs)
