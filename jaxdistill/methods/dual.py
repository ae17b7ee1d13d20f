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

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxdistill.data.negatives import MISSING, is_negative
from jaxdistill.losses.contrastive import contrastive_loss
from jaxdistill.methods.base import (STUDENT, Recipe, accumulable, embed_mined, embed_pair,
                                    student_module)
from jaxdistill.models.build import towers as towers_of
from jaxdistill.parallel.gather import gathered_similarity_logits


# config.train.accum_steps > 1: its loss reads the batch through the student's embeddings.
ACCUMULATES = True


def _mined_logits(queries: jax.Array, mined: jax.Array, mined_owner: jax.Array,
                  query_owner: jax.Array, temperature: jax.Array) -> jax.Array:
  """queries [B, E] against every mined candidate mined [B*k, E] -> logits [B, B*k] / tau, -inf
  where the candidate's owner is the query's own image or MISSING."""
  logits = queries @ mined.T / temperature
  return jnp.where(is_negative(mined_owner[None, :], query_owner[:, None]), logits, -jnp.inf)


def make_loss_fn(config: ml_collections.ConfigDict, model, mesh: Mesh):
  """loss_fn(params, frozen, extra, batch, rng, step) -> (loss, metrics, extra), an
  AccumulableLoss (train/accumulate.py): the loss reads the batch through the student's
  embeddings of its images, captions and mined negatives, so config.train.accum_steps > 1
  accumulates it over microbatches with all B (+ B*k mined) candidates in every row.

  batch: image [B,H,W,C], text_ids / text_mask [B,L], image_id [B]; with k > 0 also (from the
  bank, data/pipeline.py) neg_text_ids / neg_text_mask [B,k,L], neg_text_owner [B,k],
  neg_image [B,k,H,W,C], neg_image_owner [B,k]."""
  k = config.dual.hard_negatives
  student = towers_of(model)

  def embed(params, frozen, batch, rng):
    """{"image", "text": [b, E]; with k > 0 "neg_text", "neg_image": [b, k, E]}."""
    del frozen
    params = params[STUDENT]
    img, _, txt, _, _ = embed_pair(config, student, params, batch, rng)
    out = {"image": img, "text": txt}
    if k > 0:
      mined = embed_mined(config, student, params, batch, rng)
      out["neg_text"], out["neg_image"] = mined["text"], mined["image"]
    return out

  def loss_from_embeddings(params, frozen, extra, emb, batch, rng, step):
    del frozen, rng, step
    img, txt = emb["image"], emb["text"]
    tau = student.temperature(params[STUDENT])
    i2t, t2i = gathered_similarity_logits(mesh, img, txt, tau)       # [B, B] each, eq. 2
    parts = {}
    if k > 0:
      neg_txt = emb["neg_text"].reshape(-1, emb["neg_text"].shape[-1])      # [B*k, E]
      neg_img = emb["neg_image"].reshape(-1, emb["neg_image"].shape[-1])
      owner = batch["image_id"]
      i2t = jnp.concatenate(
          [i2t, _mined_logits(img, neg_txt, batch["neg_text_owner"].reshape(-1), owner, tau)], 1)
      t2i = jnp.concatenate(
          [t2i, _mined_logits(txt, neg_img, batch["neg_image_owner"].reshape(-1), owner, tau)], 1)
      parts["mined_valid"] = jnp.mean((batch["neg_text_owner"] != MISSING).astype(jnp.float32))
    loss, itc_parts = contrastive_loss(i2t, t2i, jnp.arange(i2t.shape[0]))   # eq. 3
    parts.update(itc_parts, itc=loss, temperature=tau)
    return loss, parts, extra

  return accumulable(config, embed, loss_from_embeddings)


def teacher_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The dual recipe reads no teacher."""
  return ()


def build(config: ml_collections.ConfigDict, mesh: Mesh, data, steps_per_epoch: int) -> Recipe:
  """The dual-encoder ITC recipe: one module "student" (model.kind = dual), no teacher. Its
  towers may be pretrained architectures started by config.init_from and partly frozen by
  config.trainable (e.g. configs/lit_teacher.py). Supports config.train.accum_steps (its loss
  is an AccumulableLoss)."""
  del data, steps_per_epoch
  student = student_module(config)
  return Recipe(name="dual", modules={STUDENT: student},
                loss_fn=make_loss_fn(config, student.model, mesh))
