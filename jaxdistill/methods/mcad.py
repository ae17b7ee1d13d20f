"""MCAD (Lei, He et al., paper 001): a dual-encoder student distilled from a dual-stream teacher
(D^DS) and a single-stream (cross) teacher (D^SS), fused by a trainable integration module.

Per step, for a batch of n pairs (losses/mcad.py has the equations and how each is read):
  1. the student embeds the batch: I^S, T^S, tau^S -> D^S (eq. 1);
  2. the frozen dual teacher embeds it: I^DS, T^DS, tau^DS -> D^DS (eq. 4) and its top-k pairs
     P_i2t, P_t2i (eq. 5);
  3. the frozen cross teacher scores only those 2 n k pairs (each image and text embedded once):
     P(match) = D^SS[P] (eq. 6) and, for the integration module, its fused [CLS] H^SS;
  4. the integration module (g1..g4, alpha; eq. 12-13) fuses H^SS with I^DS, T^DS into the
     integrated teacher's features, pair by pair -> D^T, D^FAI, D^FAT (eq. 3);
  5. the loss is the sum of the configured terms (`mcad.loss`, '+'-separated; Table 1):
       gt        L_GT     (eq. 14, InfoNCE on the ground truth)
       clip      L_CLIP   (eq. 15, TinyCLIP's affinity mimicking of the dual teacher)
       albef     L_ALBEF  (eq. 16, the student over the top-k against the cross scores)
       clip_fa   L_CLIP_FA (eq. 17, student-teacher feature alignment through the dual teacher)
       mt        L_MT     (eq. 8: student and integrated teacher against f_MT, eq. 10)
       mt_fa     L_MT_FA  (eq. 9: the feature-aligned matrices against f_MT)
     MCAD itself is mt+mt_fa (eq. 7, L_total = L_TDD + L_TFD).
Only the work a term needs runs: no cross teacher without albef / mt / mt_fa, no integration
module (and no such params) without mt / mt_fa, no teacher at all for gt alone.

Modules: "student" (config.model) and, with mt / mt_fa, "integration" (config.mcad.integration).
Frozen: the teachers' params by their config.teachers names, "dual" and "cross". A teacher whose
tokenizer differs from the student's (a CLIP's BPE, say) reads each caption in its own vocabulary
(Recipe.batch_texts: the pipeline adds <name>_text_ids / _mask). A cached dual
teacher (config.teachers.dual.kind = "cache": the features --mode=cache_teacher stored for the
train split, with the teacher's own tokenizer and image size) is read from the batch instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxdistill.config import ConfigError
from jaxdistill.losses import mcad
from jaxdistill.losses.contrastive import similarity_logits
from jaxdistill.methods.base import (STUDENT, Module, Recipe, embed_pair, same_tokenizer,
                                     student_module)
from jaxdistill.models.build import towers as towers_of
from jaxdistill.models.mcad_integration import IntegrationModule
from jaxdistill.teachers import load_teacher
from jaxdistill.teachers.cache import FeatureCache

TERMS = ("gt", "clip", "albef", "clip_fa", "mt", "mt_fa")
# Paper 001 Table 1, row -> mcad.loss (configs/mcad.py runs each with --config.mcad.loss=...).
TABLE_1 = {"L_GT": "gt", "L_CLIP (TinyCLIP)": "clip", "L_GT + L_CLIP (Leaner-and-Faster)": "gt+clip",
           "L_ALBEF + L_GT (LoopITR)": "albef+gt", "L_CLIP + L_CLIP_FA": "clip+clip_fa",
           "L_MT": "mt", "L_MT + L_MT_FA (MCAD)": "mt+mt_fa"}
INTEGRATION = "integration"
_NEEDS_DUAL = {"clip", "albef", "clip_fa", "mt", "mt_fa"}
_NEEDS_CROSS = {"albef", "mt", "mt_fa"}
_NEEDS_INTEGRATION = {"mt", "mt_fa"}


def terms(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The loss terms of `config.mcad.loss` ("mt+mt_fa" -> ("mt", "mt_fa"))."""
  return tuple(t.strip() for t in config.mcad.loss.split("+") if t.strip())


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the mcad key and the fix."""
  mc, chosen = config.mcad, terms(config)
  bad = [t for t in chosen if t not in TERMS]
  if not chosen or bad or len(set(chosen)) != len(chosen):
    raise ConfigError(f"--config.mcad.loss={mc.loss!r} is not valid: '+'-separated distinct terms "
                      f"from {', '.join(TERMS)} (MCAD: mt+mt_fa; Table 1 rows: "
                      f"{', '.join(TABLE_1.values())})")
  if set(chosen) & _NEEDS_CROSS and not 1 <= mc.k <= config.batch_size:
    raise ConfigError(f"--config.mcad.k={mc.k} must lie in [1, batch_size={config.batch_size}] "
                      "(paper 001: k = 11; Table 4: 5, 11, 17)")
  if mc.integration.mlp_depth < 1 or mc.integration.mlp_dim < 1:
    raise ConfigError("--config.mcad.integration.mlp_depth and mlp_dim must be >= 1 "
                      "(paper 001 App. B: two-layer MLPs)")


def teacher_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config.teachers sections this loss reads: "dual" and/or "cross"."""
  chosen = set(terms(config))
  return (("dual",) if chosen & _NEEDS_DUAL else ()) + (("cross",) if chosen & _NEEDS_CROSS else ())


def integration_module(config: ml_collections.ConfigDict, dual_dim: int, cross_dim: int) -> Module:
  """The trainable integration module (eq. 12-13): widths from config.mcad.integration, input
  widths from the teachers (dual_dim of I^DS / T^DS, cross_dim of H^SS)."""
  ic = config.mcad.integration
  model = IntegrationModule(embed_dim=config.model.embed_dim, mlp_dim=ic.mlp_dim,
                            mlp_depth=ic.mlp_depth, alpha_init=ic.alpha_init,
                            temperature_init=ic.temperature_init)

  def init(key):
    z = lambda *shape: jnp.zeros(shape, jnp.float32)
    top = jnp.zeros((2, 1), jnp.int32)
    return model.init(key, z(2, dual_dim), z(2, dual_dim), z(2, 1, cross_dim),
                      z(2, 1, cross_dim), top, top)["params"]
  return Module(model, init)


def teacher_text(batch: dict, name: str) -> tuple:
  """The captions as teacher `name` reads them: its own token ids (<name>_text_ids / _mask, when
  the recipe asked the pipeline for them: Recipe.batch_texts) or the student's."""
  if f"{name}_text_ids" in batch:
    return batch[f"{name}_text_ids"], batch[f"{name}_text_mask"]
  return batch["text_ids"], batch["text_mask"]


def make_loss_fn(config: ml_collections.ConfigDict, student_model, integration_model,
                 dual, cross):
  """loss_fn(params, frozen, extra, batch, rng, step) -> (loss, metrics, extra) (methods/base.py).

  params: {"student", "integration" (with mt / mt_fa)}; frozen: {"dual", "cross"} teacher params
  (those the terms read); dual / cross: the Teachers (or None when not read). batch: image
  [n,H,W,C], text_ids / text_mask [n,L]."""
  chosen, k = terms(config), config.mcad.k
  tau_ds_fixed = config.mcad.teacher_temperature
  student = towers_of(student_model)
  need_dual = bool(set(chosen) & _NEEDS_DUAL)
  need_cross = bool(set(chosen) & _NEEDS_CROSS)
  need_integration = bool(set(chosen) & _NEEDS_INTEGRATION)

  def loss_fn(params, frozen, extra, batch, rng, step):
    del step
    images = batch["image"]
    p = params[STUDENT]
    image_s, _, text_s, _, tau_s = embed_pair(config, student, p, batch, rng)
    student_logits = similarity_logits(image_s, text_s, tau_s)          # D^S (eq. 1)
    metrics = {"temperature": tau_s}

    targets = image_ds = text_ds = None
    if need_dual and dual.is_cached:                                     # eq. 4-5
      image_ds, text_ds = batch["dual_image_emb"], batch["dual_text_emb"]
    elif need_dual:
      image_ds = dual.embed_images(frozen["dual"], images)
      text_ds = dual.embed_texts(frozen["dual"], *teacher_text(batch, "dual"))
    if need_dual:
      tau_ds = tau_ds_fixed if tau_ds_fixed > 0 else dual.temperature
      targets = mcad.dual_stream_targets(image_ds, text_ds, tau_ds, k if need_cross else None)
    cls_i2t = cls_t2i = None
    if need_cross:                                                        # eq. 6 (+ H^SS)
      pair_images, pair_texts = mcad.top_k_pairs(targets.top_i2t, targets.top_t2i)
      p_match, cls = cross.pair_outputs(frozen["cross"], images, *teacher_text(batch, "cross"),
                                        pair_images.reshape(-1), pair_texts.reshape(-1))
      p_match = jax.lax.stop_gradient(p_match).reshape(pair_images.shape)
      targets = targets._replace(ss_i2t=p_match[0], ss_t2i=p_match[1])
      cls = jax.lax.stop_gradient(cls).reshape(*pair_images.shape, -1)
      cls_i2t, cls_t2i = cls[0], cls[1]
      metrics["ss_match"] = jnp.mean(p_match)
    teacher = fai = fat = None
    if need_integration:                                                  # eq. 12-13, 3
      fused = integration_model.apply({"params": params[INTEGRATION]}, image_ds, text_ds,
                                      cls_i2t, cls_t2i, targets.top_i2t, targets.top_t2i)
      teacher, fai, fat = mcad.integrated_logits(image_s, text_s, tau_s, fused,
                                                 targets.top_i2t, targets.top_t2i)
      metrics.update(alpha=params[INTEGRATION]["alpha"], teacher_temperature=fused.temperature)

    total = 0.0
    for term in chosen:
      if term == "gt":
        value, parts = mcad.gt_loss(*student_logits)
      elif term == "clip":
        value, parts = mcad.clip_loss(*student_logits, targets)
      elif term == "albef":
        value, parts = mcad.albef_loss(*student_logits, targets)
      elif term == "clip_fa":
        value, parts = mcad.clip_fa_loss(*mcad.cross_alignment_logits(
            image_s, text_s, tau_s, image_ds, text_ds, tau_ds), targets)
      elif term == "mt":
        value, parts = mcad.mt_loss(student_logits, teacher, targets)
      else:
        value, parts = mcad.mt_fa_loss(fai, fat, targets)
      total = total + value
      metrics.update(parts)
      metrics[term] = value
    return total, metrics, extra

  return loss_fn


def build(config: ml_collections.ConfigDict, mesh: Mesh, data, steps_per_epoch: int) -> Recipe:
  """The MCAD recipe: "student" (+ "integration" with mt / mt_fa); frozen = the dual and cross
  teachers' params (config.teachers.dual / .cross), as far as the terms read them; a cached dual
  teacher (kind cache: --mode=cache_teacher's features of the train split) comes in the batch."""
  del mesh, steps_per_epoch
  validate(config)
  names = teacher_names(config)
  student = student_module(config)
  loaded = {name: load_teacher(config.teachers[name]) for name in names}
  dual, cross = loaded.get("dual"), loaded.get("cross")
  if dual is not None and not (dual.is_dual or dual.is_cached):
    raise ConfigError(f"--config.teachers.dual ({dual.name}) has no dual towers: point it at a "
                      "dual-encoder or LoopITR run, a CLIP checkpoint, or its teacher cache "
                      "(kind cache)")
  if dual is not None and dual.temperature is None and config.mcad.teacher_temperature <= 0:
    raise ConfigError(f"the dual teacher {dual.name} does not say its temperature: set "
                      "--config.mcad.teacher_temperature (tau^DS of eq. 4, e.g. 0.01 for CLIP)")
  if cross is not None and cross.pair_outputs is None:
    raise ConfigError(f"--config.teachers.cross ({cross.name}) gives no single-stream pair "
                      "outputs (match probability + fused [CLS]): point it at a LoopITR run")
  own_vocabulary = {name: t.tokenize for name, t in loaded.items()
                    if not t.is_cached and not same_tokenizer(t, data)}
  mc = config.model
  images = jnp.zeros((1, mc.image_size, mc.image_size, mc.channels), jnp.float32)
  if dual is not None and dual.is_cached:
    dual_dim = FeatureCache(dual.features).image_emb.shape[-1]
  else:
    dual_dim = dual.embed_images(dual.params, images).shape[-1] if dual is not None else None
  if "clip_fa" in terms(config) and dual_dim != mc.embed_dim:
    raise ConfigError(f"mcad.loss clip_fa (eq. 17) takes dot products of the student's features "
                      f"with the dual teacher's: --config.model.embed_dim={mc.embed_dim} must "
                      f"equal the teacher's embedding width {dual_dim}")
  modules = {STUDENT: student}
  integration = None
  if set(terms(config)) & _NEEDS_INTEGRATION:
    ids = jnp.ones((1, mc.max_len), jnp.int32)
    zero = jnp.zeros((1,), jnp.int32)
    cross_dim = cross.pair_outputs(cross.params, images, ids, ids, zero, zero)[1].shape[-1]
    modules[INTEGRATION] = integration = integration_module(config, dual_dim, cross_dim)
  return Recipe(
      name="mcad",
      modules=modules,
      loss_fn=make_loss_fn(config, student.model, integration and integration.model, dual, cross),
      frozen={name: t.params for name, t in loaded.items() if not t.is_cached},
      batch_features={name: t.features for name, t in loaded.items() if t.is_cached},
      batch_texts=own_vocabulary,
  )
