"""LoopITR (J. Lei et al., paper 003): dual + cross encoder in one network, with the cross
encoder's matching scores distilled online into the dual encoder.

Per step (§3, Fig. 3): ITC over all devices' negatives (eq. 2-3); for each image m text
negatives and for each text m image negatives, chosen from the ITC similarities (hard) or at
random (Table 2); the cross encoder scores the positives and these negatives; ITM on the
positives and one negative per direction (eq. 4); distillation of the cross encoder's
positive-class scores into the dual encoder's scores over the m+1 candidates (eq. 5-7);
MLM on the cross encoder; L = L_itc + L_itm + L_mlm + w * L_distill (eq. 8), w warmed up
linearly from 0 to 1 over the first epoch (§4.1).

Teachers (Table 5): online (the same forward, under stop-grad), momentum (the state's EMA of
the student, 0.995) or offline (a finished LoopITR run, config.teachers.offline, read with its
own network through store/run.py: it may be larger than the student).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxdistill.config import ConfigError
from jaxdistill.data.masking import mask_tokens
from jaxdistill.data.tokenizer import SpecialIds
from jaxdistill.losses.contrastive import contrastive_loss
from jaxdistill.losses.distillation import listwise_distillation
from jaxdistill.losses.matching import itm_loss, mlm_loss
from jaxdistill.methods.base import (STUDENT, Recipe, accumulable, dropout_rngs, embed_pair,
                                    student_module)
from jaxdistill.models.build import Towers, towers as towers_of
from jaxdistill.models.loopitr import LoopITRModel
from jaxdistill.parallel.gather import gathered_similarity_logits
from jaxdistill.store.run import load_run


ACCUMULATES = True   # config.train.accum_steps > 1: its ITC warm-up only (validate below)


def choose_negatives(logits: jax.Array, same_item: jax.Array, num: int, mode: str,
                     key: jax.Array) -> jax.Array:
  """Column indices of `num` negatives per row, never a column of the row's own item.

  logits [R, C] (row's similarities to all columns), same_item bool [R, C] (True where the
  column is a positive of the row, e.g. another caption of the same image). mode "hard": the
  top-`num` by similarity (paper 003 §3: top-m hard negatives ranked by the dual encoder);
  "random": `num` uniformly random negatives (Table 2); "mixed" (ITM negatives only, not in
  the paper): each row takes its hard or its random negatives with probability 1/2, so that the
  cross encoder sees easy pairs beside the look-alikes. Returns int32 [R, num]."""
  if mode == "mixed":
    k_pick, k_random = jax.random.split(key)
    hard = choose_negatives(logits, same_item, num, "hard", key)
    random = choose_negatives(logits, same_item, num, "random", k_random)
    return jnp.where(jax.random.bernoulli(k_pick, 0.5, (logits.shape[0], 1)), hard, random)
  scores = jax.lax.stop_gradient(logits) if mode == "hard" else jax.random.uniform(key, logits.shape)
  scores = jnp.where(same_item, -jnp.inf, scores)
  return jax.lax.top_k(scores, num)[1]


def _candidates(diag: jax.Array, matrix: jax.Array, negatives: jax.Array) -> jax.Array:
  """[R] positive scores + [R, C] matrix gathered at negatives [R, n] -> [R, 1 + n]."""
  return jnp.concatenate([diag[:, None], jnp.take_along_axis(matrix, negatives, axis=1)], axis=1)


def distill_weight(step: jax.Array, weight: float, warmup_steps: int) -> jax.Array:
  """w of eq. 8: linear 0 -> weight over warmup_steps (the first epoch, §4.1)."""
  if warmup_steps <= 0:
    return jnp.asarray(weight, jnp.float32)
  return weight * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def make_itc_loss_fn(config: ml_collections.ConfigDict, model: LoopITRModel, mesh: Mesh):
  """The ITC-only warm-up's loss (loopitr.itc_only_steps; not in the paper): eq. 2-3 alone, the
  value and gradients the full loss has there (its other terms are weighted 0), without
  running the cross encoder, MLM or the teacher. An AccumulableLoss (train/accumulate.py): it
  reads the batch through the two towers' embeddings, so config.train.accum_steps > 1
  accumulates it over microbatches with every device's whole batch as negatives."""
  student = towers_of(model)

  def embed(params, frozen, batch, rng):
    del frozen
    img_emb, _, txt_emb, _, _ = embed_pair(config, student, params[STUDENT], batch, rng)
    return {"image": img_emb, "text": txt_emb}

  def loss_from_embeddings(params, frozen, extra, emb, batch, rng, step):
    del frozen, batch, rng, step
    img_emb, txt_emb = emb["image"], emb["text"]
    temperature = student.temperature(params[STUDENT])
    i2t, t2i = gathered_similarity_logits(mesh, img_emb, txt_emb, temperature)
    l_itc, parts = contrastive_loss(i2t, t2i, jnp.arange(img_emb.shape[0]))
    parts.update(itc=l_itc, temperature=temperature)
    return config.loopitr.itc_weight * l_itc, parts, extra

  return accumulable(config, embed, loss_from_embeddings)


def make_loss_fn(config: ml_collections.ConfigDict, model: LoopITRModel, mesh: Mesh,
                 steps_per_epoch: int, special: SpecialIds, offline: Towers | None = None):
  """Returns loss_fn(params, frozen, extra, batch, rng, step) -> (loss, metrics, extra).

  batch: image float32 [B,H,W,C], text_ids / text_mask int32 [B,L], image_id int32 [B] —
  global arrays sharded on the mesh's batch axes. The teacher: online (this forward), the
  momentum EMA frozen["ema"]["student"], or the offline run frozen["offline"] applied with
  `offline` (its towers). special: the tokenizer's special ids (MLM masking). A term whose
  weight is 0 is not computed: no cross-encoder pairs, negatives or teacher forward for it.
  A plain function, not accumulable (config.train.accum_steps): its in-batch hard negatives,
  cross encoder and MLM read token outputs of the whole batch at once (`validate`)."""
  lp = config.loopitr
  m = lp.num_negatives
  use_itm, use_mlm = lp.itm_weight != 0, lp.mlm_weight != 0
  use_distill = lp.distill_negatives != "none" and lp.distill_weight != 0
  distill_text = use_distill and lp.distill_negatives in ("text", "both")
  distill_image = use_distill and lp.distill_negatives in ("image", "both")
  num_text_neg = m if distill_text else 1    # ITM needs one negative per direction
  num_image_neg = m if distill_image else 1
  separate_itm = use_itm and lp.itm_negatives != lp.negative_sampling
  warmup = steps_per_epoch if lp.distill_warmup_steps < 0 else lp.distill_warmup_steps
  student = towers_of(model)
  teacher_towers = {"online": None, "momentum": student, "offline": offline}[lp.teacher]

  def cross_scores(t: Towers, params, img_tok, txt_tok, txt_mask, img_idx, txt_idx, rngs=None):
    """ITM logits [P, 2] for the pairs (img_idx[p], txt_idx[p])."""
    return model.apply({"params": params}, txt_tok[txt_idx], txt_mask[txt_idx], img_tok[img_idx],
                       deterministic=rngs is None, rngs=rngs, method=LoopITRModel.match_logits) \
        if t is student else jnp.stack([t.match_scores(params, img_tok[img_idx], txt_tok[txt_idx],
                                                       txt_mask[txt_idx])], axis=1)

  def matching_and_distillation(params, frozen, batch, img_tok, txt_tok, i2t, t2i, temperature,
                                keys, drop, parts):
    """(L_itm eq. 4, L_distill eq. 5-7) from one cross-encoder pass over the positives and the
    negatives chosen from the ITC similarities."""
    k_text_neg, k_image_neg, k_itm = keys
    images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    b = ids.shape[0]
    # Negatives from the ITC similarities; other captions of the same image are never negatives.
    same = batch["image_id"][:, None] == batch["image_id"][None, :]
    rows = jnp.arange(b)
    img_idx, txt_idx = [rows], [rows]
    scored = use_distill or not separate_itm   # the negatives the distillation (or ITM) scores
    if scored:
      text_neg = choose_negatives(i2t, same, num_text_neg, lp.negative_sampling, k_text_neg)
      image_neg = choose_negatives(t2i, same.T, num_image_neg, lp.negative_sampling, k_image_neg)
      img_idx += [jnp.repeat(rows, num_text_neg), image_neg.reshape(-1)]
      txt_idx += [text_neg.reshape(-1), jnp.repeat(rows, num_image_neg)]
    if separate_itm:   # ITM negatives drawn differently from the distillation candidates
      itm_text = choose_negatives(i2t, same, 1, lp.itm_negatives, k_itm)[:, 0]
      itm_image = choose_negatives(t2i, same.T, 1, lp.itm_negatives, jax.random.fold_in(k_itm, 1))[:, 0]
      img_idx += [rows, itm_image]
      txt_idx += [itm_text, rows]
    img_idx, txt_idx = jnp.concatenate(img_idx), jnp.concatenate(txt_idx)
    logits = cross_scores(student, params, img_tok, txt_tok, mask, img_idx, txt_idx, drop(2))
    pos_logits = logits[:b]
    if scored:
      text_neg_logits = logits[b:b + b * num_text_neg].reshape(b, num_text_neg, 2)
      image_neg_logits = logits[b + b * num_text_neg:b + b * (num_text_neg + num_image_neg)]
      image_neg_logits = image_neg_logits.reshape(b, num_image_neg, 2)

    # ITM (eq. 4): positives, and one negative text per image and one negative image per text.
    l_itm = jnp.zeros((), jnp.float32)
    if use_itm:
      if separate_itm:
        itm_neg = logits[b * (1 + num_text_neg + num_image_neg) if scored else b:]
      else:
        itm_neg = jnp.concatenate([text_neg_logits[:, 0], image_neg_logits[:, 0]])
      itm_logits = jnp.concatenate([pos_logits, itm_neg])
      itm_labels = jnp.concatenate([jnp.zeros(b, jnp.int32),
                                    jnp.ones(itm_neg.shape[0], jnp.int32)])
      l_itm, itm_parts = itm_loss(itm_logits, itm_labels)
      parts.update(itm_parts)

    # Distillation (eq. 5-7): student s_{x,y} = similarity, teacher h^pos = positive-class logit.
    l_distill = jnp.zeros((), jnp.float32)
    if not use_distill:
      return l_itm, l_distill
    if teacher_towers is None:     # online teacher: reuse this forward's cross scores
      t_pos, t_text, t_image = pos_logits[:, 0], text_neg_logits[..., 0], image_neg_logits[..., 0]
    else:                          # momentum / offline teacher: its own towers and cross encoder
      t_params = frozen["ema"][STUDENT] if lp.teacher == "momentum" else frozen["offline"]
      _, t_img_tok = teacher_towers.embed_image(t_params, images)
      _, t_txt_tok = teacher_towers.embed_text(t_params, ids, mask)
      n_main = b * (1 + num_text_neg + num_image_neg)
      t_logits = cross_scores(teacher_towers, t_params, t_img_tok, t_txt_tok, mask,
                              img_idx[:n_main], txt_idx[:n_main])[:, 0]
      t_logits = jax.lax.stop_gradient(t_logits)
      t_pos = t_logits[:b]
      t_text = t_logits[b:b + b * num_text_neg].reshape(b, num_text_neg)
      t_image = t_logits[b + b * num_text_neg:].reshape(b, num_image_neg)
    # i2t / t2i are similarities divided by the temperature; eq. 5 needs s itself.
    directions = (("distill_txt", distill_text, i2t, text_neg, t_text),   # N_i^txt, eq. 7
                  ("distill_img", distill_image, t2i, image_neg, t_image))
    for name, enabled, logits_rows, negatives, teacher_neg in directions:
      if enabled:
        sim = logits_rows * temperature
        s = _candidates(jnp.diagonal(sim), sim, negatives)
        t = jnp.concatenate([t_pos[:, None], teacher_neg], axis=1)
        parts[name], _ = listwise_distillation(s, t, temperature, stop_gradient=lp.stop_gradient)
        l_distill += parts[name]
    return l_itm, l_distill

  def masked_language_modelling(params, batch, img_tok, key, drop, parts):
    """L_mlm: the cross encoder predicts BERT-style masked caption tokens. The vocabulary head
    runs only at the masked positions: the first `capacity` of them in the batch, twice the
    expected count, so in practice all (mlm_dropped counts any left out)."""
    ids, mask = batch["text_ids"], batch["text_mask"]
    masked_ids, labels, weights = mask_tokens(ids, mask, key, probability=lp.mlm_probability,
                                              vocab_size=config.model.vocab_size, special=special)
    capacity = min(ids.size, math.ceil(2 * lp.mlm_probability * ids.size))
    positions = jnp.nonzero(weights.reshape(-1), size=capacity, fill_value=0)[0]
    chosen = weights.reshape(-1)[positions] * (jnp.arange(capacity) < jnp.sum(weights > 0))
    _, masked_tok = student.embed_text(params, masked_ids, mask, rngs=drop(3))
    mlm_logits = model.apply({"params": params}, masked_tok, mask, img_tok, positions,
                             deterministic=drop(4) is None, rngs=drop(4),
                             method=LoopITRModel.mlm_logits_at)
    l_mlm, mlm_parts = mlm_loss(mlm_logits[None], labels.reshape(-1)[positions][None],
                                chosen[None])
    parts.update(mlm_parts, mlm_dropped=jnp.sum(weights) - jnp.sum(chosen))
    return l_mlm

  def loss_fn(params, frozen, extra, batch, rng, step):
    params = params[STUDENT]
    k_text_neg, k_image_neg, k_itm, k_mlm = jax.random.split(rng, 4)
    drop = lambda i: dropout_rngs(config, rng, i)
    b = batch["text_ids"].shape[0]
    img_emb, img_tok, txt_emb, txt_tok, temperature = embed_pair(config, student, params, batch,
                                                                 rng)

    # ITC against the gathered negatives of all devices (eq. 2-3).
    i2t, t2i = gathered_similarity_logits(mesh, img_emb, txt_emb, temperature)
    l_itc, parts = contrastive_loss(i2t, t2i, jnp.arange(b))
    l_itm = l_mlm = l_distill = jnp.zeros((), jnp.float32)
    if use_itm or use_distill:
      l_itm, l_distill = matching_and_distillation(
          params, frozen, batch, img_tok, txt_tok, i2t, t2i, temperature,
          (k_text_neg, k_image_neg, k_itm), drop, parts)
    if use_mlm:
      l_mlm = masked_language_modelling(params, batch, img_tok, k_mlm, drop, parts)

    # eq. 8, with the distillation warm-up of §4.1 and the optional ITC-only warm-up.
    joint = (step >= lp.itc_only_steps).astype(jnp.float32)
    w_distill = distill_weight(step - lp.itc_only_steps, lp.distill_weight, warmup) * joint
    loss = (lp.itc_weight * l_itc + joint * (lp.itm_weight * l_itm + lp.mlm_weight * l_mlm)
            + w_distill * l_distill)
    parts.update(itc=l_itc, itm=l_itm, mlm=l_mlm, distill=l_distill, distill_weight=w_distill,
                 temperature=temperature)
    return loss, parts, extra

  return loss_fn


def teacher_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config.teachers sections this configuration reads."""
  return ("offline",) if config.loopitr.teacher == "offline" else ()


def build(config: ml_collections.ConfigDict, mesh: Mesh, data, steps_per_epoch: int) -> Recipe:
  """The LoopITR recipe: one module "student" (model.kind = loopitr); with teacher=offline, the
  run named by config.teachers.offline (kind workdir) is read as frozen["offline"]. Only the
  ITC warm-up (its `warmup` loss) accumulates over config.train.accum_steps microbatches."""
  student = student_module(config)
  frozen, offline = {}, None
  if config.loopitr.teacher == "offline":
    spec = config.teachers.offline
    if spec.kind != "workdir":
      raise ConfigError(f"--config.teachers.offline.kind={spec.kind!r}: the offline LoopITR "
                        "teacher is a finished LoopITR run; set kind=workdir and its path")
    run = load_run(spec.path, spec.dtype, what="--config.teachers.offline.path")
    if run.towers.match_scores is None:
      raise ConfigError(f"--config.teachers.offline.path={spec.path!r} holds a "
                        f"{run.config.model.get('kind', 'dual')} run without a cross encoder: "
                        "point it at a LoopITR run")
    frozen["offline"], offline = run.params, run.towers
  return Recipe(
      name="loopitr",
      modules={STUDENT: student},
      loss_fn=make_loss_fn(config, student.model, mesh, steps_per_epoch, data.special_ids, offline),
      frozen=frozen,
      ema={STUDENT: config.loopitr.momentum} if config.loopitr.teacher == "momentum" else {},
      warmup=((config.loopitr.itc_only_steps, make_itc_loss_fn(config, student.model, mesh))
              if config.loopitr.itc_only_steps > 0 else None),
  )


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the loopitr key and the fix."""
  lp, b = config.loopitr, config.batch_size
  m = lp.num_negatives
  if not 1 <= m < b:
    raise ConfigError(
        f"--config.loopitr.num_negatives={m} needs 1 <= m < batch_size={b}: the m hard negatives "
        f"are mined in-batch, so use at most --config.loopitr.num_negatives={b - 1} or a larger "
        "--config.batch_size")
  for key, options in (("negative_sampling", ("hard", "random")), ("itm_negatives", ("hard", "random", "mixed")),
                       ("distill_negatives", ("image", "text", "both", "none")),
                       ("teacher", ("online", "momentum", "offline"))):
    if lp[key] not in options:
      raise ConfigError(f"--config.loopitr.{key}={lp[key]!r} is not valid: use one of "
                        f"{', '.join(options)}")
  if config.model.kind != "loopitr":
    raise ConfigError(f"--config.model.kind={config.model.kind!r}: the LoopITR recipe trains a "
                      "LoopITR network; set --config.model.kind=loopitr")
  if not 0.0 < lp.mlm_probability < 1.0:
    raise ConfigError(f"--config.loopitr.mlm_probability={lp.mlm_probability} must be in (0, 1)")
  accum, steps = config.train.get("accum_steps", 1), config.train.num_steps
  if accum > 1 and lp.itc_only_steps < steps:
    raise ConfigError(
        f"--config.train.accum_steps={accum}: LoopITR accumulates only its ITC warm-up (its hard "
        "negatives, cross encoder and MLM need the whole batch in one pass): set "
        f"--config.train.accum_steps=1, or --config.loopitr.itc_only_steps={steps} for a run that "
        "is all ITC warm-up")
