"""Paper 004 (unimodal-backbone retrieval with self-supervised KD): L = L_cl + L_kd.

Student (models/dual.py with a shared encoder, built by configs/unimodal_kd.py): a pretrained
unimodal image tower and a pretrained unimodal text tower, each truncated to its first N layers
(config.init_from "layers"), then one randomly initialised shared transformer layer applied to
each modality separately (§3.2); the representations are the shared layer's [CLS] outputs
(model.text_pool = cls; mean is the measured alternative), L2-normalised, with no projection
(model.project = False, §3.3).

  L_cl (§3.3): CLIP's InfoNCE over the global batch, negatives all-gathered from every device
       (parallel/gather.py); the paper's formula sums the image->text and text->image terms, so
       L_cl = CE_i2t + CE_t2i (twice losses/contrastive.py's mean of the two).
  L_kd (§3.4): a single linear head f_p (module "kd_head", randomly initialised, shared by both
       modalities) maps the student's image and text representations to the teacher's width;
       z^s = f_p(h) / ||f_p(h)||. The frozen self-supervised image teacher (config.teachers.ssl,
       e.g. the DINO ViT of configs/ssl_vit.py) gives z_v^t, its normalised [CLS]. InfoNCE of
       z_v^s and of z_w^s against the batch's teacher features plus a memory bank (MoCo) of the
       teacher features of earlier steps (losses/unimodal_kd.py); after the loss the batch's
       teacher features are enqueued (parallel/queue.py), so the bank never holds the current
       batch. Bank entries of the row's own image (earlier epochs) are masked.
  L = L_cl + kd_weight * L_kd (the paper: weight 1; 0 is the "w/o KD" row and loads no teacher).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxdistill.config import ConfigError
from jaxdistill.losses.contrastive import contrastive_loss
from jaxdistill.losses.unimodal_kd import project_and_normalize, unimodal_kd_loss
from jaxdistill.methods.base import STUDENT, Module, Recipe, embed_pair, student_module
from jaxdistill.models.bert import mean_pool
from jaxdistill.models.build import towers as towers_of
from jaxdistill.parallel import queue as fq
from jaxdistill.parallel.gather import gathered_similarity_logits
from jaxdistill.teachers import load_teacher

KD_HEAD = "kd_head"
TEACHER = "ssl"


def validate(config: ml_collections.ConfigDict) -> None:
  u = config.unimodal_kd
  if u.kd_weight < 0:
    raise ConfigError(f"--config.unimodal_kd.kd_weight={u.kd_weight} must be >= 0 (0 = w/o KD)")
  if u.bank_size < 0:
    raise ConfigError(f"--config.unimodal_kd.bank_size={u.bank_size} must be >= 0 (0 = no "
                      "memory bank; paper 004: 65,536)")
  if u.kd_temperature <= 0:
    raise ConfigError(f"--config.unimodal_kd.kd_temperature={u.kd_temperature} must be > 0")
  if config.model.image_pool != "cls":
    raise ConfigError(f"--config.model.image_pool={config.model.image_pool!r}: paper 004 reads the "
                      "image [CLS] of the shared layer; set it to cls")


def teacher_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The self-supervised image teacher, read only when KD is on."""
  return (TEACHER,) if config.unimodal_kd.kd_weight > 0 else ()


def make_loss_fn(config: ml_collections.ConfigDict, model: nn.Module, teacher, mesh: Mesh):
  """loss_fn(params, frozen, extra, batch, rng, step) -> (loss, metrics, extra).

  params {"student", "kd_head": f_p's Dense params}; frozen {"ssl": teacher params}; extra {"bank": FeatureQueue of
  teacher features, ids = image ids} (no bank when bank_size = 0). teacher: the Teacher, None
  without KD (L_cl alone). batch: image [B,H,W,C],
  text_ids / text_mask [B,L], image_id [B]."""
  u = config.unimodal_kd
  student = towers_of(model)
  text_pool = config.model.text_pool

  def loss_fn(params, frozen, extra, batch, rng, step):
    del step
    p = params[STUDENT]
    img, img_tokens, txt, txt_tokens, tau = embed_pair(config, student, p, batch, rng)
    i2t, t2i = gathered_similarity_logits(mesh, img, txt, tau)
    itc, parts = contrastive_loss(i2t, t2i, jnp.arange(i2t.shape[0]))
    l_cl = 2.0 * itc                                    # §3.3: the sum of both directions
    parts = dict(parts, itc=l_cl, temperature=tau)
    if teacher is None:
      return l_cl, parts, extra
    h_v = img_tokens[:, 0]                              # h_{K,v,[I_CLS]}
    h_w = txt_tokens[:, 0] if text_pool == "cls" else mean_pool(txt_tokens, batch["text_mask"])
    f_p = params[KD_HEAD]
    project = lambda h: project_and_normalize(h, f_p["kernel"], f_p["bias"])
    z_t = teacher.embed_images(frozen[TEACHER], batch["image"])       # [B, Dt], unit-norm
    ids = batch["image_id"]
    if "bank" in extra:
      bank = extra["bank"]
      keys, key_ids, key_valid = bank.values["teacher"], bank.ids, fq.valid_mask(bank)
    else:
      keys = jnp.zeros((0, z_t.shape[1]), z_t.dtype)
      key_ids, key_valid = jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
    l_kd, kd_parts = unimodal_kd_loss(project(h_v), project(h_w), z_t, keys, ids, key_ids,
                                      key_valid, u.kd_temperature)
    if "bank" in extra:
      extra = dict(extra, bank=fq.enqueue(extra["bank"], {"teacher": z_t}, ids))
      kd_parts = dict(kd_parts, bank_filled=jnp.mean(key_valid.astype(jnp.float32)))
    parts.update(kd_parts, kd=l_kd)
    return l_cl + u.kd_weight * l_kd, parts, extra

  return loss_fn


def build(config: ml_collections.ConfigDict, mesh: Mesh, data, steps_per_epoch: int) -> Recipe:
  """Modules "student" (the dual encoder with its shared layer) and, with KD, "kd_head" (f_p:
  Dense to the teacher's width); frozen {"ssl": teacher params}; carry {"bank"}."""
  del data, steps_per_epoch
  u = config.unimodal_kd
  student = student_module(config)
  modules, frozen, head, teacher, init_extra = {STUDENT: student}, {}, None, None, None
  if u.kd_weight > 0:
    teacher = load_teacher(config.teachers[TEACHER])
    if teacher.embed_images is None:
      raise ConfigError(f"--config.teachers.{TEACHER}: {teacher.name} gives no image features; "
                        "point it at an image model (configs/ssl_vit.py's run)")
    mc = config.model
    dummy = jnp.zeros((1, mc.image_size, mc.image_size, mc.channels), jnp.float32)
    width = jax.eval_shape(teacher.embed_images, teacher.params, dummy).shape[-1]
    head = nn.Dense(width)                    # f_p: shared-layer width (= text_width) -> Dt
    modules[KD_HEAD] = Module(head, lambda key: head.init(key, jnp.zeros((1, mc.text_width)))["params"])
    frozen[TEACHER] = teacher.params
    if u.bank_size > 0:
      spec = {"teacher": jax.ShapeDtypeStruct((width,), jnp.float32)}
      init_extra = lambda: {"bank": fq.create_queue(u.bank_size, spec)}
  return Recipe(name="unimodal_kd", modules=modules, frozen=frozen, init_extra=init_extra,
                loss_fn=make_loss_fn(config, student.model, teacher, mesh))
