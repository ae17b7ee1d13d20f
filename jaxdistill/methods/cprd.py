"""CPRD (Chen et al., CVPR 2024, paper 002): a dual-encoder student trained with ITC against
momentum-feature queues plus a ranking distillation from a frozen teacher on hard negatives.

Per step, image->text (text->image is symmetric):
  1. momentum encoder (the TrainState's EMA of the student, 0.995, §4.2) embeds the batch;
     candidates = batch momentum features + queue Q (N_q entries);
  2. ITC of the student's queries against the candidates (eq. 1-2); a candidate with the
     query's example id (another copy of the positive) or an empty queue slot is no negative;
  3. top-K hard negatives by student similarity among the negatives (eq. 3);
  4. the teacher scores them (eq. 4; a negative is scorable when it is in the batch or among
     the N_c most recent queue entries, the cross-encoder input queue Q_c of §3.2.2; others
     are invalid, as pairs absent from the offline bank are);
  5. distillation: `cprd.distill` = none (ITC alone) | kl | m3se | rm3se | cprd | cprd_mstar
     (Table 5); L = L_align + w * L_distill (eq. 9, w = 1), each direction averaged (eq. 8);
  6. the batch's momentum features are enqueued (parallel/queue.py).

Q_c stores what the teacher needs to score an entry, not pixels: the entry's example index
into the train split's images (kept once as a device array beside the teacher's params, so a
queued image is `train_images[index]`, the same pixels the batch had: the pipeline does no
random augmentation) and its caption's token ids and mask (L int32 each, smaller than an
index + caption pair lookup would save, and independent of which caption the pipeline drew).
Q_c is the N_c most recent entries of Q (`queue.age < N_c`), so one ring buffer serves both.

Offline (`cprd.bank_dir`, §3.2.2): scores come from the similarity bank that
`--mode=cache_teacher` wrote with a cross teacher (each image's and each caption's top-N
candidates by dual-teacher similarity, with the cross teacher's P(match)); a hard negative absent
from its query's bank entry is invalid, and any queue entry may be scored (no N_c limit). The
queue then also stores each entry's caption row, the key of a text in the bank.

Teacher scores (`cprd.teacher_scores`): "cross" = the cross encoder's ITM match probability
p = softmax(ITM logits)[match] = sigmoid of its log-odds (Teacher.match_scores), the p in [0, 1]
that eq. 4's threshold m reads (§3.1: p_ij in [0, 1], trained with the ITM cross-entropy); "dual" =
cosine similarity of the teacher's dual-encoder embeddings (then m is a cosine threshold).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxdistill.config import ConfigError
from jaxdistill.data.benchmark import Benchmark
from jaxdistill.data.compositional import normalize_images
from jaxdistill.losses import ranking
from jaxdistill.losses.contrastive import contrastive_loss
from jaxdistill.methods.base import STUDENT, Recipe, dropout_rngs, student_module
from jaxdistill.models.build import towers as towers_of
from jaxdistill.parallel import queue as fq
from jaxdistill.teachers import load_teacher
from jaxdistill.teachers.base import pair_match_probability
from jaxdistill.teachers.cache import CacheError, FeatureCache

DISTILL = ("none", "kl", "m3se", "rm3se", "cprd", "cprd_mstar")
TEACHER_SCORES = ("cross", "dual")
_NEG = -1e30   # finite "minus infinity" for masked logits (no NaN in empty rows)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the cprd key and the fix."""
  cp = config.cprd
  if cp.distill not in DISTILL:
    raise ConfigError(f"--config.cprd.distill={cp.distill!r} is not valid: use one of {', '.join(DISTILL)}")
  if cp.teacher_scores not in TEACHER_SCORES:
    raise ConfigError(f"--config.cprd.teacher_scores={cp.teacher_scores!r} is not valid: use one "
                      f"of {', '.join(TEACHER_SCORES)}")
  if cp.queue_size < 1:
    raise ConfigError(f"--config.cprd.queue_size={cp.queue_size} must be >= 1 (N_q, paper 002 §4.2)")
  if not 0 <= cp.cross_queue_size <= cp.queue_size:
    raise ConfigError(f"--config.cprd.cross_queue_size={cp.cross_queue_size} (N_c) must lie in "
                      f"[0, queue_size={cp.queue_size}]: Q_c is the N_c most recent entries of Q")
  if cp.num_hard < 1:
    raise ConfigError(f"--config.cprd.num_hard={cp.num_hard} (K) must be >= 1; use "
                      "--config.cprd.distill=none for ITC alone")
  if not 0.0 < cp.momentum < 1.0:
    raise ConfigError(f"--config.cprd.momentum={cp.momentum} must lie in (0, 1) (paper: 0.995)")
  if cp.bank_dir:
    if cp.distill not in ("cprd", "cprd_mstar"):
      raise ConfigError(f"--config.cprd.bank_dir is the offline CPRD variant (§3.2.2) and works with "
                        f"--config.cprd.distill=cprd or cprd_mstar, not {cp.distill}: the Table 5 "
                        "baselines also need the positive pair's score, which the bank does not hold")
    if cp.teacher_scores != "cross":
      raise ConfigError("--config.cprd.bank_dir holds cross-encoder scores: set "
                        "--config.cprd.teacher_scores=cross (or drop bank_dir for the dual target)")
    if not os.path.exists(os.path.join(cp.bank_dir, "meta.json")):
      raise ConfigError(f"--config.cprd.bank_dir={cp.bank_dir} holds no finished teacher cache: "
                        "build one with --mode=cache_teacher (a LoopITR teacher) and point at its "
                        "train/ directory")
  elif cp.distill != "none" and not (config.teachers.teacher.kind and config.teachers.teacher.path):
    raise ConfigError(f"--config.cprd.distill={cp.distill} needs a frozen teacher: set "
                      "--config.teachers.teacher.kind=workdir --config.teachers.teacher.path=<LoopITR "
                      "workdir>, or --config.cprd.bank_dir=<teacher cache>/train for offline scores")


def _scorer(teacher, kind: str):
  """score(teacher params, images [Pi,H,W,C], ids [Pt,L], mask [Pt,L]) -> [P], P = max(Pi, Pt).

  Pairs of B queries with K candidates each, flattened query-major: the query side comes once
  ([B, ...]) and the candidate side as [B*K, ...]; Pi == Pt: plain pairs. Each image and text is
  embedded once: dual, the embeddings are broadcast; cross, P(match) of pair p = (image
  p // (P / Pi), text p // (P / Pt)) by `teachers.base.pair_match_probability`."""
  if kind == "cross":
    if not teacher.is_cross:
      raise ConfigError(f"teacher {teacher.name} has no cross encoder: use "
                        "--config.cprd.teacher_scores=dual or a cross teacher")

    def cross(p, images, ids, mask):
      n = max(images.shape[0], ids.shape[0])
      pairs = jnp.arange(n, dtype=jnp.int32)
      return pair_match_probability(teacher, p, images, ids, mask,
                                    pairs // (n // images.shape[0]), pairs // (n // ids.shape[0]))
    return cross
  if not teacher.is_dual:
    raise ConfigError(f"teacher {teacher.name} has no dual towers: use --config.cprd.teacher_scores=cross")

  def dual(p, images, ids, mask):
    img, txt = teacher.embed_images(p, images), teacher.embed_texts(p, ids, mask)
    b = min(img.shape[0], txt.shape[0])
    return jnp.sum(img.reshape(b, -1, img.shape[-1]) * txt.reshape(b, -1, txt.shape[-1]),
                   axis=-1).reshape(-1)
  return dual


def load_bank(bank_dir: str, train_image_ids: np.ndarray, captions_per_image: int) -> dict:
  """The offline similarity bank (§3.2.2) of a finished teacher cache of the train split as
  device-ready arrays: i2t_keys int32 [N, n] (caption rows c = C * image row + caption),
  i2t_scores [N, n], t2i_keys [N*C, n] (image rows), t2i_scores [N*C, n]; scores are the
  cross teacher's P(match), as the online `cross` target."""
  try:
    cache = FeatureCache(bank_dir)
  except CacheError as e:
    raise ConfigError(f"--config.cprd.bank_dir={bank_dir}: {e}") from None
  if not cache.has_bank or sorted(cache.meta["bank"]) != ["i2t", "t2i"]:
    raise ConfigError(f"--config.cprd.bank_dir={bank_dir} has no i2t + t2i cross bank: rerun "
                      "--mode=cache_teacher with a cross teacher (--config.teachers.teacher.path=<a LoopITR run>)")
  if (cache.meta["captions_per_image"] != captions_per_image
      or not np.array_equal(np.asarray(cache.image_ids), train_image_ids)):
    raise ConfigError(f"--config.cprd.bank_dir={bank_dir} was cached for another train split "
                      f"({len(cache.image_ids)} images x {cache.meta['captions_per_image']} captions; "
                      f"this run trains on {len(train_image_ids)} x {captions_per_image}): rerun "
                      "--mode=cache_teacher with this config's data settings")
  return {"i2t_keys": np.asarray(cache.i2t_index, np.int32),
          "i2t_scores": np.asarray(cache.i2t_score, np.float32),
          "t2i_keys": np.asarray(cache.t2i_index, np.int32),
          "t2i_scores": np.asarray(cache.t2i_score, np.float32)}


def make_loss_fn(config: ml_collections.ConfigDict, model, score_pairs, image_offset: int,
                 captions_per_image: int):
  """loss_fn(params, frozen, extra, batch, rng, step) -> (loss, metrics, extra); extra =
  {"queue": FeatureQueue}; frozen["ema"]["student"] is the momentum encoder.

  Online teacher (cprd.bank_dir = ""): frozen["teacher"] = teacher params, frozen["images"] =
  float32 [N_train,H,W,C], and score_pairs = `_scorer(...)`. Offline (bank_dir set):
  frozen["bank"] = `load_bank(...)`, score_pairs None; the batch then also carries
  caption_index [B] (which of its image's C captions it is), so that a text is addressable by
  its caption row. batch: image [B,H,W,C], text_ids / text_mask [B,L], image_id [B] (the train
  split's example i has image_id image_offset + i)."""
  cp = config.cprd
  k, n_c, w, c = cp.num_hard, cp.cross_queue_size, cp.distill_weight, captions_per_image
  offline = bool(cp.bank_dir)
  student = towers_of(model)

  def encode(params, images, ids, mask, rngs=(None, None)):
    img, _ = student.embed_image(params, images, rngs=rngs[0])
    txt, _ = student.embed_text(params, ids, mask, rngs=rngs[1])
    return img, txt

  def direction(logits, negatives, score_hard, score_positive, tau):
    """One direction's distillation loss. score_hard(hard [B,K]) -> (teacher scores [B,K],
    has_score bool [B,K]); score_positive() -> the positive pairs' teacher scores [B]."""
    hard, available = ranking.top_k_hard_negatives(logits, negatives, k)
    scores, has_score = score_hard(hard)
    scored = available & has_score
    b = logits.shape[0]
    parts = {"scored": jnp.mean(jnp.sum(scored, axis=1).astype(jnp.float32))}
    if cp.distill in ("cprd", "cprd_mstar"):
      valid = (ranking.threshold_valid(scores, scored, cp.threshold) if cp.distill == "cprd"
               else ranking.adaptive_valid(scores, scored))
      loss, more = ranking.contrastive_partial_ranking_loss(logits, negatives, hard, available,
                                                            scores, valid)
      return loss, {**parts, **more}
    diag = jnp.take_along_axis(logits, jnp.arange(b)[:, None], axis=1)
    student = jnp.concatenate([diag, jnp.take_along_axis(logits, hard, axis=1)], axis=1)
    teacher = jnp.concatenate([score_positive()[:, None], scores], axis=1)
    keep = jnp.concatenate([jnp.ones((b, 1), bool), scored], axis=1)
    tau = jax.lax.stop_gradient(tau)
    if cp.distill == "kl":
      return ranking.kl_ranking_loss(student * tau, teacher, keep, tau)[0], parts
    fn = ranking.m3se_loss if cp.distill == "m3se" else ranking.rm3se_loss
    return fn(student * tau, teacher, keep)[0], parts

  def scorers(frozen, batch, queue, negatives, caption_row):
    """((i2t score_hard, i2t score_positive), (t2i ...)) for `direction`; caption_row [B] is
    each text's row in the bank (offline only)."""
    images, ids, mask, image_id = batch["image"], batch["text_ids"], batch["text_mask"], batch["image_id"]
    b, qv = ids.shape[0], queue.values
    cand_index = jnp.concatenate([image_id - image_offset, qv["image_index"]])   # image rows
    if offline:   # §3.2.2: pairs absent from the bank are unscored, hence invalid
      bank = frozen["bank"]
      cand_caption_row = jnp.concatenate([caption_row, qv["caption_row"]])
      i2t = lambda hard: ranking.bank_lookup(bank["i2t_keys"], bank["i2t_scores"],
                                             image_id - image_offset, cand_caption_row[hard])
      t2i = lambda hard: ranking.bank_lookup(bank["t2i_keys"], bank["t2i_scores"],
                                             caption_row, cand_index[hard])
      return (i2t, None), (t2i, None)
    teacher = frozen["teacher"]
    # Scorable online: in the batch or among the N_c most recent queue entries (Q_c).
    scorable = jnp.concatenate([jnp.ones((b,), bool), fq.age(queue) < n_c])[None, :]
    scorable = jnp.broadcast_to(scorable, negatives.shape)
    cand_ids_tok = jnp.concatenate([ids, qv["text_ids"]])
    cand_mask_tok = jnp.concatenate([mask, qv["text_mask"]])
    positive = lambda: score_pairs(teacher, images, ids, mask)

    def i2t(hard):   # image i (once) with texts hard[i, :]
      s = score_pairs(teacher, images, cand_ids_tok[hard].reshape(b * k, -1),
                      cand_mask_tok[hard].reshape(b * k, -1))
      return s.reshape(b, k), jnp.take_along_axis(scorable, hard, axis=1)

    def t2i(hard):   # images hard[i, :] with text i (once)
      s = score_pairs(teacher, frozen["images"][cand_index[hard].reshape(-1)], ids, mask)
      return s.reshape(b, k), jnp.take_along_axis(scorable, hard, axis=1)
    return (i2t, positive), (t2i, positive)

  def loss_fn(params, frozen, extra, batch, rng, step):
    del step
    params, ema_params, queue = params[STUDENT], frozen["ema"][STUDENT], extra["queue"]
    images, ids, mask, image_id = batch["image"], batch["text_ids"], batch["text_mask"], batch["image_id"]
    b = ids.shape[0]
    img, txt = encode(params, images, ids, mask,
                      (dropout_rngs(config, rng, 0), dropout_rngs(config, rng, 1)))
    tau = student.temperature(params)
    m_img, m_txt = jax.lax.stop_gradient(encode(ema_params, images, ids, mask))
    qv = queue.values
    # Candidates: columns [0, B) the batch's momentum keys, [B, B + N_q) the queue.
    cand_txt = jnp.concatenate([m_txt, qv["text"]])
    cand_img = jnp.concatenate([m_img, qv["image"]])
    cand_ids = jnp.concatenate([image_id, queue.ids])
    cand_valid = jnp.concatenate([jnp.ones((b,), bool), fq.valid_mask(queue)])
    negatives = fq.negative_mask(image_id, cand_ids, cand_valid)            # [B, B + N_q]
    positive = jnp.arange(cand_ids.shape[0])[None, :] == jnp.arange(b)[:, None]
    keep = negatives | positive
    i2t = jnp.where(keep, img @ cand_txt.T / tau, _NEG)
    t2i = jnp.where(keep, txt @ cand_img.T / tau, _NEG)
    l_itc, parts = contrastive_loss(i2t, t2i, jnp.arange(b, dtype=jnp.int32))   # eq. 1-2

    # A text's key in the bank: C * (its image's row) + which caption it is.
    caption_row = (image_id - image_offset) * c + batch["caption_index"] if offline else None
    l_distill = jnp.zeros((), jnp.float32)
    if cp.distill != "none":
      score_i2t, score_t2i = scorers(frozen, batch, queue, negatives, caption_row)
      l_i2t, p_i2t = direction(i2t, negatives, *score_i2t, tau)
      l_t2i, p_t2i = direction(t2i, negatives, *score_t2i, tau)
      l_distill = (l_i2t + l_t2i) / 2                                        # eq. 8
      parts.update({f"i2t_{n}": v for n, v in p_i2t.items()})
      parts.update({f"t2i_{n}": v for n, v in p_t2i.items()})

    keys = {"image": m_img, "text": m_txt, "image_index": image_id - image_offset,
            "text_ids": ids, "text_mask": mask}
    if offline:
      keys["caption_row"] = caption_row
    queue = fq.enqueue(queue, keys, image_id)
    loss = l_itc + w * l_distill                                             # eq. 9
    parts.update(itc=l_itc, distill=l_distill, temperature=tau)
    return loss, parts, {"queue": queue}

  return loss_fn


def queue_spec(config: ml_collections.ConfigDict) -> dict:
  """Per-entry fields of the queue (Q and Q_c in one ring buffer): momentum features, the image
  row and caption tokens (online scoring), and the caption row (offline bank lookups)."""
  e, length = config.model.embed_dim, config.model.max_len
  spec = jax.ShapeDtypeStruct
  fields = {"image": spec((e,), jnp.float32), "text": spec((e,), jnp.float32),
            "image_index": spec((), jnp.int32), "text_ids": spec((length,), jnp.int32),
            "text_mask": spec((length,), jnp.int32)}
  if config.cprd.bank_dir:
    fields["caption_row"] = spec((), jnp.int32)
  return fields


def teacher_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config.teachers sections this configuration reads: "teacher" when scoring online."""
  return ("teacher",) if config.cprd.distill != "none" and not config.cprd.bank_dir else ()


def build(config: ml_collections.ConfigDict, mesh: Mesh, data, steps_per_epoch: int) -> Recipe:
  """The CPRD recipe: module "student" with its momentum EMA; frozen = the teacher
  (config.teachers.teacher) and the train images, or offline the similarity bank
  (config.cprd.bank_dir); nothing with cprd.distill=none."""
  del mesh, steps_per_epoch
  validate(config)
  cp = config.cprd
  student = student_module(config)
  if not isinstance(data, Benchmark):
    raise ConfigError("cprd runs on the bundled benchmark only (--config.data.name=fashion_grid): "
                      "its cross-encoder input queue addresses the train images in memory by "
                      "example index, which real datasets do not keep")
  train = data.splits["train"]
  captions_per_image = int(data.tokens["train"][0].shape[1])
  image_offset = int(train.image_ids[0])
  if not np.array_equal(train.image_ids, image_offset + np.arange(len(train.image_ids))):
    raise ConfigError("cprd: the train split's image_ids are not consecutive, so queued example "
                      "indices cannot address its images; rebuild the benchmark (--config.data)")
  frozen, score_pairs = {}, None
  if cp.distill != "none" and cp.bank_dir:
    frozen["bank"] = load_bank(cp.bank_dir, train.image_ids, captions_per_image)
  elif cp.distill != "none":
    teacher = load_teacher(config.teachers.teacher)
    score_pairs = _scorer(teacher, cp.teacher_scores)
    frozen["teacher"] = teacher.params
    frozen["images"] = np.asarray(normalize_images(train.images))
  return Recipe(
      name="cprd",
      modules={STUDENT: student},
      loss_fn=make_loss_fn(config, student.model, score_pairs, image_offset, captions_per_image),
      frozen=frozen,
      ema={STUDENT: cp.momentum},
      init_extra=lambda: {"queue": fq.create_queue(cp.queue_size, queue_spec(config))},
  )
