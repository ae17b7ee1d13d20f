"""Leaner-and-Faster (Ren & Zhu, paper 000): one stage of its student, on the training contract.

The whole method is a pipeline of runs (configs/leaner_faster.py lists them, train/pipeline.py
runs them); this recipe is the student's part of one run, picked by `leaner_faster.stage`:

  stage1  §3.2.1, task-agnostic, on the unpaired pool (data/unpaired.py): the student's image
          tower against the frozen teacher's image tower on images (eq. 2) and its text tower
          against the teacher's text tower on texts (eq. 3), each batch's images and captions
          read apart. `leaner_faster.stage1_loss`: contrastive (eq. 2-3) | mse (Table 2
          "stage-1_MSE") | infonce (Table 2 "stage-1_InfoNCE": the student's own inter-modal
          eq. 1 on the pool's pairs; no teacher). `tower` picks L_v, L_t or both (default both).
  stage2  §3.2.2, task-specific, on the paired train split: L = L_t2v + L_v2t + L_KD + L_HN
          (`losses/leaner_faster.py stage2_loss`) against the fine-tuned teacher T' (frozen);
          `tower` is the tower being fine-tuned (SF: image, then text; "both" = w/o SF), which
          picks the eq. 2/3 KD term and the HN direction: image queries against the k mined
          captions of the bank (embedded by the network's own text tower: under SF the
          teacher's, shared and fixed) while the image tower trains, text queries against the k
          mined images (embedded by the trained, fixed student image tower) while the text
          tower trains. Which towers train is config.trainable (data), not this recipe.

Modules: "student" (config.model, model.kind = dual). Frozen: the teacher's params as
frozen["teacher"] (config.teachers.teacher: a dual run's workdir), unless stage-1 InfoNCE.
Every term reads the batch through per-example embeddings, so config.train.accum_steps > 1
accumulates it (train/accumulate.py; the teacher's embeddings are its `features`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxdistill.config import ConfigError
from jaxdistill.data.negatives import is_negative
from jaxdistill.losses import leaner_faster as lf_losses
from jaxdistill.methods.base import (STUDENT, Recipe, accumulable, check_teacher_tokenizer,
                                     embed_mined, embed_pair, student_module)
from jaxdistill.models.build import towers as towers_of
from jaxdistill.teachers import load_teacher

ACCUMULATES = True
TEACHER = "teacher"
STAGES = ("stage1", "stage2")
STAGE1_LOSSES = ("contrastive", "mse", "infonce")
TRAIN_SPLITS = ("train", "unpaired")


def section() -> ml_collections.ConfigDict:
  """The `leaner_faster` config section with its defaults (paper 000 where it says)."""
  return ml_collections.ConfigDict(dict(
      stage="stage2",            # stage1 | stage2
      stage1_loss="contrastive",  # contrastive (eq. 2-3) | mse | infonce (Table 2 ablations)
      tower="image",             # the tower(s) the loss distils / fine-tunes: image | text | both
      symmetric=False,           # eq. 2-3 read one way (student queries); True: also teacher queries
      temperature=0.0,           # tau of every term; 0 = the student's learnable temperature
      teacher_temperature=0.0,   # tau of T' in the KL; 0 = the teacher run's own learned tau
      kd_temperature=1.0,        # Hinton's T dividing both KL logits
      infonce_weight=1.0,        # §3.2.2: L = L_t2v + L_v2t + L_KD + L_HN, all weights 1
      kl_weight=1.0,
      contrastive_weight=1.0,
      hn_weight=1.0,
      hard_negatives=0,          # k mined negatives per example (stage 2 with a bank); 0 = no HN
      in_batch_negatives=True,   # HN softmax over in-batch + mined (False: positive + mined only)
  ))


def _lf(config):
  return config.leaner_faster


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the leaner_faster key and the fix."""
  lf = _lf(config)
  for key, value, options in (("stage", lf.stage, STAGES), ("stage1_loss", lf.stage1_loss, STAGE1_LOSSES),
                              ("tower", lf.tower, lf_losses.TOWERS)):
    if value not in options:
      raise ConfigError(f"--config.leaner_faster.{key}={value!r} is not valid: use one of "
                        f"{', '.join(options)}")
  split = config.data.get("train_split", "") or "train"
  if split not in TRAIN_SPLITS:
    raise ConfigError(f"--config.data.train_split={split!r} is not valid: use one of "
                      f"{', '.join(TRAIN_SPLITS)} (unpaired: paper 000's stage-1 pool)")
  bundled = config.data.get("name", "fashion_grid") == "fashion_grid"
  if split == "unpaired" and bundled and config.data.get("num_unpaired", 0) <= 0:
    raise ConfigError("--config.data.train_split='unpaired' needs --config.data.num_unpaired > 0 "
                      "(the size of the unpaired pool, data/unpaired.py)")
  if split == "unpaired" and not bundled and not (config.data.unpaired_images
                                                  and config.data.unpaired_texts):
    raise ConfigError("--config.data.train_split='unpaired' on real data needs "
                      "--config.data.unpaired_images (an image folder or shards) and "
                      "--config.data.unpaired_texts (a text file or shards)")
  if lf.stage == "stage1" and lf.hard_negatives:
    raise ConfigError(f"--config.leaner_faster.hard_negatives={lf.hard_negatives}: stage 1 reads "
                      "no mined negatives (paper 000 §3.2.2 mines for stage 2); set it to 0")
  if lf.hard_negatives < 0 or lf.kd_temperature <= 0 or lf.temperature < 0:
    raise ConfigError("--config.leaner_faster.hard_negatives must be >= 0, kd_temperature > 0 "
                      "and temperature >= 0 (0 = the student's learnable tau)")
  if config.model.get("kind", "dual") != "dual":
    raise ConfigError(f"--config.model.kind={config.model.kind!r}: the Leaner-and-Faster student "
                      "is a dual encoder; use model.kind=dual")


def teacher_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The teacher section read: "teacher" (T in stage 1, the fine-tuned T' in stage 2), none for
  stage-1 InfoNCE."""
  lf = _lf(config)
  return () if lf.stage == "stage1" and lf.stage1_loss == "infonce" else (TEACHER,)


def make_loss_fn(config: ml_collections.ConfigDict, model, teacher):
  """loss_fn(params, frozen, extra, batch, rng, step) -> (loss, metrics, extra) (methods/base.py),
  an AccumulableLoss (train/accumulate.py): every term reads the batch through per-example
  embeddings (the student's, the frozen teacher's as `features`), so config.train.accum_steps > 1
  accumulates it with the whole batch in every row.

  batch: image [B,H,W,C], text_ids / text_mask [B,L], image_id [B]; in stage 2 with k > 0 also
  the bank's neg_text_ids / neg_text_mask [B,k,L], neg_text_owner [B,k], neg_image [B,k,H,W,C],
  neg_image_owner [B,k] (data/pipeline.py). teacher: the Teacher (None without one)."""
  lf = _lf(config)
  student = towers_of(model)
  k = lf.hard_negatives if lf.stage == "stage2" else 0
  image_side, text_side = lf.tower in ("image", "both"), lf.tower in ("text", "both")
  teacher_tau = lf.teacher_temperature or (teacher.temperature if teacher is not None else None)

  def features(frozen, batch):
    """The frozen teacher's embeddings teacher_image, teacher_text [b, E]."""
    return {"teacher_image": teacher.embed_images(frozen[TEACHER], batch["image"]),
            "teacher_text": teacher.embed_texts(frozen[TEACHER], batch["text_ids"],
                                                batch["text_mask"])}

  def embed(params, frozen, batch, rng):
    """{"image", "text": [b, E]; in stage 2 with k > 0 "mined_text" and / or "mined_image"
    [b, k, E] (the tower being fine-tuned's queries meet the other modality's mined items)}."""
    del frozen
    p = params[STUDENT]
    img, _, txt, _, _ = embed_pair(config, student, p, batch, rng)
    out = {"image": img, "text": txt}
    if k > 0:                                                      # §3.2.2 HN
      mined = embed_mined(config, student, p, batch, rng, text=image_side, image=text_side)
      out.update({f"mined_{name}": value for name, value in mined.items()})
    return out

  def loss_from_embeddings(params, frozen, extra, emb, batch, rng, step):
    del frozen, rng, step
    img, txt = emb["image"], emb["text"]
    tau = (jnp.asarray(lf.temperature) if lf.temperature > 0
           else student.temperature(params[STUDENT]))
    metrics = {"temperature": tau}
    if lf.stage == "stage1" and lf.stage1_loss == "infonce":      # Table 2: stage-1_InfoNCE
      loss, parts = lf_losses.infonce_loss(img, txt, tau)
      metrics.update(parts, stage1=loss)
      return loss, metrics, extra
    t_img, t_txt = batch["teacher_image"], batch["teacher_text"]
    if lf.stage == "stage1":                                       # eq. 2 (images), eq. 3 (texts)
      loss = jnp.zeros((), jnp.float32)
      for name, on, s, t in (("image", image_side, img, t_img), ("text", text_side, txt, t_txt)):
        if not on:
          continue
        if lf.stage1_loss == "contrastive":
          term = lf_losses.intra_modal_contrastive_loss(s, t, tau, symmetric=lf.symmetric)[0]
        else:
          term = lf_losses.mse_distillation_loss(s, t)[0]
        metrics[f"stage1_{name}"] = term
        loss = loss + term
      metrics["stage1"] = loss
      return loss, metrics, extra
    mined = {name: emb[name] for name in ("mined_text", "mined_image") if name in emb}
    owner = batch["image_id"]
    if "mined_text" in mined:
      mined["mined_text_valid"] = is_negative(batch["neg_text_owner"], owner[:, None])
    if "mined_image" in mined:
      mined["mined_image_valid"] = is_negative(batch["neg_image_owner"], owner[:, None])
    loss, parts = lf_losses.stage2_loss(
        img, txt, t_img, t_txt, tau, tower=lf.tower, teacher_temperature=teacher_tau,
        kd_temperature=lf.kd_temperature, in_batch_negatives=lf.in_batch_negatives,
        infonce_weight=lf.infonce_weight, kl_weight=lf.kl_weight,
        contrastive_weight=lf.contrastive_weight, hn_weight=lf.hn_weight, **mined)
    metrics.update(parts)
    return loss, metrics, extra

  return accumulable(config, embed, loss_from_embeddings,
                     None if teacher is None else features)


def build(config: ml_collections.ConfigDict, mesh: Mesh, data, steps_per_epoch: int) -> Recipe:
  """One Leaner-and-Faster student stage: module "student"; frozen = the teacher's params."""
  del mesh, steps_per_epoch
  validate(config)
  student = student_module(config)
  teacher = None
  frozen = {}
  if teacher_names(config):
    teacher = load_teacher(config.teachers[TEACHER])
    if not teacher.is_dual:
      raise ConfigError(f"--config.teachers.teacher ({teacher.name}) has no dual towers: point it "
                        "at a dual-encoder run (configs/teacher.py:dual)")
    check_teacher_tokenizer("leaner_faster", TEACHER, teacher, data)
    mc = config.model
    images = jax.ShapeDtypeStruct((1, mc.image_size, mc.image_size, mc.channels), jnp.float32)
    width = jax.eval_shape(teacher.embed_images, teacher.params, images).shape[-1]
    if width != mc.embed_dim:
      raise ConfigError(f"--config.model.embed_dim={mc.embed_dim} must equal the teacher's "
                        f"embedding width {width}: eq. 2-3 and the KD terms compare student and "
                        "teacher embeddings by dot product")
    frozen[TEACHER] = teacher.params
  return Recipe(name="leaner_faster", modules={STUDENT: student},
                loss_fn=make_loss_fn(config, student.model, teacher), frozen=frozen)
