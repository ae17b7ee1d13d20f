"""Dual encoder trained with ITC, optionally with hard negatives mined from the whole corpus
(paper 000 §3.2.2 "HN", stage 2; the "w/o HN" row of its Table 2 is hard_negatives = 0).

Loss: the symmetric InfoNCE of LoopITR eq. 2-3 / paper 000 §3.1 over all devices' in-batch
negatives (`parallel/gather.py`). With k = dual.hard_negatives > 0, every example also brings the
k captions and k images mined for it by --mode=mine (the bank; paper 000: "for each image y we
use f(y) as query to the index and obtain its top-k texts as negative samples", and the reverse
for texts). Paper 000 does not say how the mined negatives enter InfoNCE; we append all B*k mined
captions as extra candidate columns of every image row (and all B*k mined images to every text
row), as DPR does with its in-batch + hard negatives: logits [B, B + B*k] per direction. A mined
candidate owned by the row's own image (a positive) or missing from the bank is masked to -inf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxdistill.losses.contrastive import contrastive_loss
from jaxdistill.methods.base import Recipe, dual_towers
from jaxdistill.mining.bank import MISSING
from jaxdistill.models.dual import DualEncoder
from jaxdistill.models.text import TextEncoder
from jaxdistill.models.vit import ViT
from jaxdistill.parallel.gather import gathered_similarity_logits


def build_model(mc: ml_collections.ConfigDict, dtype: Any = jnp.float32) -> DualEncoder:
  """DualEncoder (ViT image tower, BERT-style text tower) from the `model` config section; the
  student of the dual and CPRD recipes. dtype: computation dtype (params stay float32)."""
  image_encoder = ViT(mc.patch_size, mc.vision_width, mc.vision_layers, mc.vision_heads,
                      mc.vision_mlp, stem=mc.stem, dropout_rate=mc.dropout_rate, dtype=dtype)
  text_encoder = TextEncoder(mc.vocab_size, mc.max_len, mc.text_width, mc.text_layers,
                             mc.text_heads, mc.text_mlp, dropout_rate=mc.dropout_rate, dtype=dtype)
  return DualEncoder(image_encoder, text_encoder, mc.embed_dim, image_pool=mc.image_pool,
                     temperature_init=mc.temperature_init, dtype=dtype)


def param_initializer(model: DualEncoder, mc: ml_collections.ConfigDict):
  """init(key) -> the DualEncoder's params, from one dummy image and caption of `mc`'s sizes."""

  def init(key):
    images = jnp.zeros((1, mc.image_size, mc.image_size, mc.channels), jnp.float32)
    ids = jnp.zeros((1, mc.max_len), jnp.int32)
    return model.init(key, images, ids, jnp.ones_like(ids))["params"]
  return init


def _mined_logits(queries: jax.Array, mined: jax.Array, mined_owner: jax.Array,
                  query_owner: jax.Array, temperature: jax.Array) -> jax.Array:
  """queries [B, E] against every mined candidate mined [B*k, E] -> logits [B, B*k] / tau, -inf
  where the candidate's owner is the query's own image or MISSING."""
  logits = queries @ mined.T / temperature
  drop = (mined_owner[None, :] == query_owner[:, None]) | (mined_owner[None, :] == MISSING)
  return jnp.where(drop, -jnp.inf, logits)


def make_loss_fn(config: ml_collections.ConfigDict, model: DualEncoder, mesh: Mesh):
  """loss_fn(params, teacher_params, batch, step) -> (loss, metrics).

  batch: image [B,H,W,C], text_ids / text_mask [B,L], image_id [B]; with k > 0 also (from the
  bank, data/pipeline.py) neg_text_ids / neg_text_mask [B,k,L], neg_text_owner [B,k],
  neg_image [B,k,H,W,C], neg_image_owner [B,k]."""
  k = config.dual.hard_negatives

  def loss_fn(params, teacher_params, batch, step):
    del teacher_params, step
    apply = lambda method, *args: model.apply({"params": params}, *args, method=method)[0]
    img = apply(DualEncoder.encode_image, batch["image"])
    txt = apply(DualEncoder.encode_text, batch["text_ids"], batch["text_mask"])
    tau = model.apply({"params": params}, method=DualEncoder.temperature)
    i2t, t2i = gathered_similarity_logits(mesh, img, txt, tau)       # [B, B] each, eq. 2
    parts = {}
    if k > 0:
      b, length = batch["text_ids"].shape
      neg_txt = apply(DualEncoder.encode_text, batch["neg_text_ids"].reshape(b * k, length),
                      batch["neg_text_mask"].reshape(b * k, length))
      neg_img = apply(DualEncoder.encode_image,
                      batch["neg_image"].reshape(b * k, *batch["neg_image"].shape[2:]))
      owner = batch["image_id"]
      i2t = jnp.concatenate(
          [i2t, _mined_logits(img, neg_txt, batch["neg_text_owner"].reshape(-1), owner, tau)], 1)
      t2i = jnp.concatenate(
          [t2i, _mined_logits(txt, neg_img, batch["neg_image_owner"].reshape(-1), owner, tau)], 1)
      parts["mined_valid"] = jnp.mean((batch["neg_text_owner"] != MISSING).astype(jnp.float32))
    loss, itc_parts = contrastive_loss(i2t, t2i, jnp.arange(i2t.shape[0]))   # eq. 3
    parts.update(itc_parts, itc=loss, temperature=tau)
    return loss, parts

  return loss_fn


def build(config: ml_collections.ConfigDict, mesh: Mesh, steps_per_epoch: int) -> Recipe:
  """The dual-encoder ITC recipe (no teacher, no cross encoder: match_scores None)."""
  del steps_per_epoch
  model = build_model(config.model)
  embed_image, embed_text = dual_towers(model)
  return Recipe(name="dual", model=model, init_params=param_initializer(model, config.model),
                loss_fn=make_loss_fn(config, model, mesh),
                embed_image=embed_image, embed_text=embed_text, match_scores=None)
