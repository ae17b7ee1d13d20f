"""Leaner-and-Faster losses (Ren & Zhu, NAACL 2022, paper 000, §3.1, §3.2, Table 2).

Owns: stage 1's intra-modal contrastive distillation (eq. 2 images, eq. 3 texts) and its Table 2
ablations (MSE; inter-modal InfoNCE, eq. 1); stage 2's KD terms (§3.2.2: the KL between the
teacher's and the student's image-text matching distributions, and the eq. 2/3 contrastive term
against the fine-tuned teacher's features), its HN term (InfoNCE with corpus-mined negatives)
and the combined objective L = L_t2v + L_v2t + L_KD + L_HN with a weight per term.

Notation (the paper's, of its Fig. 1): f_v / f_t image / text towers; superscript T the target
(teacher) dual encoder, S the compressed student, T' the teacher fine-tuned on paired in-domain
data (§3.2.2, "henceforth kept fixed"). Every embedding is [N, D] and L2-normalised by its tower
(models/dual.py, teachers/base.py); these functions take them as given (`mse_distillation_loss`
alone normalises, see there). A teacher's embeddings (and temperature) are under stop_gradient
in every function: no gradient reaches them.

Reading of the paper (the extracted equations lost every sub- and superscript; the prose fixes
them):
- Eq. 1 (§3.1): "f_t(x_i) and f_v(y_j) are the L2-normalised embeddings of text in the i-th pair
  and image in the j-th pair", so eq. 1 is the text-query direction,
  L_t2v = -1/N sum_i log exp(f_t(x_i).f_v(y_i)/tau) / sum_j exp(f_t(x_i).f_v(y_j)/tau), and "the
  final objective is the sum of L_t2v and its symmetric version L_v2t": a sum, where
  `contrastive_loss` returns the mean of the two directions (so `infonce_loss` = 2x it).
- Eq. 2: "we feed [the images] to both f_v^S and f_v^T ... then optimize the following contrastive
  objective for updating f_v^S": L_v = -1/N sum_i log exp(f_v^S(y_i).f_v^T(y_i)/tau) /
  sum_j exp(f_v^S(y_i).f_v^T(y_j)/tau). One direction, the student's embedding the query and the
  teacher's embeddings of the N batch items the keys (positive: the same item; negatives: the
  teacher's embeddings of the other items), as eq. 1 has one query per row; the teacher is
  frozen, so its side carries stop_gradient. Eq. 3 is "the same formulation symmetrically applied
  to language modality" (L_t with f_t^S, f_t^T on unpaired texts): the same function. The other
  reading (also teacher queries against student keys) is `symmetric=True`.
- Table 2's "stage-1_MSE (mean-square-error between f_v^S and f_v^T)" and "stage-1_InfoNCE
  (identical to the loss in Section 3.1)": `mse_distillation_loss`, `infonce_loss`.
- §3.2.2 KD, "the Kullback-Leibler divergence between image-text matching distribution predicted
  by f_v^S and f_t^S and the one predicted by f_v^T' and f_t^T' ... resembles ... (Hinton et al.,
  2015)": KL(teacher || student) (Hinton's direction, `distillation.kl_divergence`), over the
  in-batch candidates, for both the i2t and the t2i distribution, summed like eq. 1's two
  directions. Each model's distribution uses its own temperature ("predicted by" it; the teacher's
  defaults to the student's), then Hinton's KD temperature divides both (default 1, no T^2).
- §3.2.2 KD, "the other is the same contrastive objective defined in Section 3.2.1": eq. 2 (resp.
  eq. 3) between the student tower being fine-tuned and the fine-tuned teacher's same-modality
  tower (f_v^S vs f_v^T' when the image tower trains). Not the inter-modal one: under SF the
  student's text tower *is* the teacher's (f_t^T', "share the same text encoder with the target
  dual-encoder"), so f_v^S against f_t^T' would be L_t2v + L_v2t again; the paper's "indirectly
  encourages the alignment between visual and language representations" fits the intra-modal
  term (f_v^T' is aligned with f_t^T').
- §3.2.2 HN: "for each image y we use f(y) as query to the index and obtain its top-k texts as
  negative samples" (and the reverse for texts); how they enter InfoNCE is not said. We read: one
  direction (queries = the tower being trained, candidates = the other modality), each query's
  candidates are the in-batch ones (its positive and the other N-1) plus its own k mined ones,
  cross-entropy on the positive (`hard_negative_loss`). `methods/dual.py` instead appends all
  N*k mined candidates of the batch to every row (DPR); passing mined [M, D] instead of
  [N, k, D] gives exactly that. `in_batch_negatives=False` is the other reading (positive + k
  mined only, so that L_HN does not repeat L_t2v / L_v2t's in-batch negatives).
- "The complete training objective of stage-2 is defined as L = L + L + L + L": four terms; the
  paper's Fig. 1 caption names them, "the sum of L_t2v, L_v2t, L_KD, and L_HN", and L_KD is both
  KD kinds above (Table 2's "w/o KD" removes KD as a technique). `stage2_loss` weighs each.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxdistill.losses.contrastive import contrastive_loss, row_cross_entropy, similarity_logits
from jaxdistill.losses.distillation import kl_divergence

TOWERS = ("image", "text", "both")


def _frozen(*arrays):
  """The teacher's side: stop_gradient (float temperatures become arrays)."""
  return jax.lax.stop_gradient(tuple(jnp.asarray(a) for a in arrays))


# ----------------------------------------------------------------------------- stage 1

def intra_modal_contrastive_loss(student: jax.Array, teacher: jax.Array,
                                 temperature: jax.Array | float, symmetric: bool = False
                                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 2 (images: f_v^S vs f_v^T) / eq. 3 (texts: f_t^S vs f_t^T): intra-modal contrastive KD.

  student: [N, D] the student's embeddings of N unpaired items (L2-normalised); teacher: [N, D]
  the frozen teacher's embeddings of the same items (row i = item i), under stop_gradient;
  temperature: scalar tau (a gradient reaches it if it is traced, e.g. a learnable student tau).
  L = -1/N sum_i log exp(<s_i, t_i>/tau) / sum_j exp(<s_i, t_j>/tau): student queries against the
  teacher's keys, positive = the same item, negatives = the teacher's other N-1 items (module
  docstring). symmetric=True: the mean of that and the teacher-query direction
  (-log exp(<t_i, s_i>/tau) / sum_j exp(<t_i, s_j>/tau)), `contrastive_loss` on the pair.
  Also the KD contrastive term of stage 2 (§3.2.2) against the fine-tuned teacher's tower.
  Returns (loss, {"intra_s2t": the student-query mean CE, and with symmetric "intra_t2s"}).
  """
  chex.assert_rank([student, teacher], 2)
  chex.assert_equal_shape([student, teacher])
  (teacher,) = _frozen(teacher)
  s2t, t2s = similarity_logits(student, teacher, jnp.asarray(temperature))   # [N, N] each
  positives = jnp.arange(student.shape[0], dtype=jnp.int32)
  if symmetric:
    loss, parts = contrastive_loss(s2t, t2s, positives)
    return loss, {"intra_s2t": parts["itc_i2t"], "intra_t2s": parts["itc_t2i"]}
  loss = jnp.mean(row_cross_entropy(s2t, positives))
  return loss, {"intra_s2t": loss}


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, sqrt(eps)) over the last axis (models/dual.py's `l2_normalize`)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def mse_distillation_loss(student: jax.Array, teacher: jax.Array, normalize: bool = True
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Table 2 "stage-1_MSE": mean-square error between f^S and f^T (the teacher under stop_gradient).

  student, teacher: [N, D] embeddings of the same N items. normalize=True (default) compares the
  L2-normalised embeddings: §3.1 defines f(.) as the L2-normalised embeddings, eq. 2 (which this
  ablation replaces) uses them, and retrieval only reads their directions; unnormalised CLIP
  embeddings have norms unrelated to their use, and the student's projection would spend capacity
  matching them. On unit vectors the loss is (2 - 2 cos(s_i, t_i)) / D averaged over i, a
  function of the cosine alone, with no temperature. normalize=False: the raw embeddings.
  Reduction: mean over all N*D elements (torch's `mse_loss` default).
  Returns (loss, {"mse_sq_dist": mean over rows of ||s_i - t_i||^2 (= loss * D)}).
  """
  chex.assert_rank([student, teacher], 2)
  chex.assert_equal_shape([student, teacher])
  (teacher,) = _frozen(teacher)
  dtype = jnp.promote_types(student.dtype, jnp.float32)
  student, teacher = student.astype(dtype), teacher.astype(dtype)
  if normalize:
    student, teacher = _l2_normalize(student), _l2_normalize(teacher)
  sq = jnp.sum(jnp.square(student - teacher), axis=-1)                  # [N]
  return jnp.mean(sq) / student.shape[-1], {"mse_sq_dist": jnp.mean(sq)}


def infonce_loss(image: jax.Array, text: jax.Array, temperature: jax.Array | float
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 1 (§3.1), L_t2v + L_v2t: CLIP's inter-modal InfoNCE, summed over the two directions.

  image, text: [N, D] L2-normalised embeddings of N pairs (row i of each is pair i); temperature
  scalar tau. Table 2's "stage-1_InfoNCE" (on the student's own towers), stage 2's first two
  terms, and the teacher's own fine-tuning (§3.2.2, "standard InfoNCE loss"). This is
  `similarity_logits` + `contrastive_loss`, which returns the *mean* of the two directions; the
  paper sums them ("the final objective is the sum of L_t2v and its symmetric version"), so the
  loss here is twice `contrastive_loss`'s.
  Returns (loss, {"infonce_v2t": mean CE of image queries, "infonce_t2v": of text queries}).
  """
  i2t, t2i = similarity_logits(image, text, jnp.asarray(temperature))
  _, parts = contrastive_loss(i2t, t2i, jnp.arange(image.shape[0], dtype=jnp.int32))
  v2t, t2v = parts["itc_i2t"], parts["itc_t2i"]
  return v2t + t2v, {"infonce_v2t": v2t, "infonce_t2v": t2v}


# ----------------------------------------------------------------------------- stage 2

def matching_kl_loss(student_image: jax.Array, student_text: jax.Array,
                     teacher_image: jax.Array, teacher_text: jax.Array,
                     temperature: jax.Array | float,
                     teacher_temperature: jax.Array | float | None = None,
                     kd_temperature: jax.Array | float = 1.0
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """§3.2.2 KD, first kind: KL(teacher || student) of the in-batch image-text matching distributions.

  student_image, student_text: [N, D] from (f_v^S, f_t^S) (under SF one of them is the fixed
  tower shared with the teacher); teacher_image, teacher_text: [N, D] from (f_v^T', f_t^T'),
  under stop_gradient; temperature: the student's tau; teacher_temperature: the teacher's own
  (None: the student's), under stop_gradient; kd_temperature: Hinton's T, dividing both
  logits (default 1: each model's own distribution; no T^2 factor, `kl_divergence`).
  p_i2t = softmax_j(<v_i, t_j> / tau / T) for the student, q_i2t the same for the teacher; the
  same over images for t2i. L = mean_i KL(q_i2t,i || p_i2t,i) + mean_i KL(q_t2i,i || p_t2i,i)
  (two directions summed, as eq. 1's; `distillation.kl_divergence` for each).
  Returns (loss, {"kd_kl_i2t", "kd_kl_t2i"}).
  """
  chex.assert_rank([student_image, student_text, teacher_image, teacher_text], 2)
  chex.assert_equal_shape([student_image, student_text, teacher_image, teacher_text])
  if teacher_temperature is None:
    teacher_temperature = temperature
  teacher_image, teacher_text, teacher_temperature = _frozen(teacher_image, teacher_text,
                                                             teacher_temperature)
  s_i2t, s_t2i = similarity_logits(student_image, student_text, jnp.asarray(temperature))
  t_i2t, t_t2i = similarity_logits(teacher_image, teacher_text, teacher_temperature)
  kd_temperature = jnp.asarray(kd_temperature)
  i2t = kl_divergence(s_i2t, t_i2t, kd_temperature)[0]
  t2i = kl_divergence(s_t2i, t_t2i, kd_temperature)[0]
  return i2t + t2i, {"kd_kl_i2t": i2t, "kd_kl_t2i": t2i}


def hard_negative_logits(queries: jax.Array, candidates: jax.Array, mined: jax.Array,
                         temperature: jax.Array | float, mined_valid: jax.Array | None = None,
                         in_batch_negatives: bool = True) -> tuple[jax.Array, jax.Array]:
  """§3.2.2 HN: each query's candidate logits, in-batch plus corpus-mined, divided by tau.

  queries: [N, D] (the tower being trained, e.g. f_v^S(y_i)); candidates: [N, D] the other
  modality's in-batch embeddings (row i = query i's positive); mined: either [N, k, D], query i's
  own k mined negatives (embedded by the candidates' tower), or [M, D], a shared pool every query
  sees (methods/dual.py's reading: M = N*k, all mined negatives of the batch); mined_valid: bool
  [N, k] resp. [N, M] (or broadcastable to it), False = left out of query i's softmax (missing
  from the bank, or a positive of query i: the caller decides); None = all valid.
  in_batch_negatives: True -> columns [<q_i, c_j>/tau for j < N] ++ [mined], positive column i;
  False -> [<q_i, c_i>/tau] ++ [mined], positive column 0.
  Returns (logits [N, N + k] / [N, N + M] (or [N, 1 + ...]), positives int32 [N]); left-out
  mined columns are -inf.
  """
  chex.assert_rank([queries, candidates], 2)
  chex.assert_equal_shape([queries, candidates])
  temperature = jnp.asarray(temperature)
  chex.assert_rank(temperature, 0)
  n = queries.shape[0]
  if mined.ndim == 3:
    chex.assert_equal_shape_prefix([queries, mined], 1)
    mined_logits = jnp.einsum("nd,nkd->nk", queries, mined) / temperature        # [N, k]
  elif mined.ndim == 2:
    mined_logits = queries @ mined.T / temperature                               # [N, M]
  else:
    raise ValueError(f"hard_negative_logits: mined must be [N, k, D] (per query) or [M, D] "
                     f"(shared), got shape {mined.shape}")
  chex.assert_equal(mined.shape[-1], queries.shape[-1])
  if mined_valid is not None:
    mined_valid = jnp.broadcast_to(mined_valid, mined_logits.shape)
    chex.assert_type(mined_valid, bool)
    mined_logits = jnp.where(mined_valid, mined_logits, -jnp.inf)
  if in_batch_negatives:
    in_batch = queries @ candidates.T / temperature                              # [N, N]
    positives = jnp.arange(n, dtype=jnp.int32)
  else:
    in_batch = jnp.sum(queries * candidates, axis=-1, keepdims=True) / temperature   # [N, 1]
    positives = jnp.zeros((n,), jnp.int32)
  return jnp.concatenate([in_batch, mined_logits.astype(in_batch.dtype)], axis=1), positives


def hard_negative_loss(queries: jax.Array, candidates: jax.Array, mined: jax.Array,
                       temperature: jax.Array | float, mined_valid: jax.Array | None = None,
                       in_batch_negatives: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """§3.2.2 HN, one direction: InfoNCE of each query over its in-batch and mined candidates.

  Arguments as `hard_negative_logits`. L_HN = mean_i -log softmax(logits_i)[positive_i] (the
  row-wise CE of contrastive.py). With every mined negative left out it is that direction's
  in-batch InfoNCE (L_v2t for image queries). Call it with image queries and mined texts while
  the image tower trains (and f_t is fixed), with text queries and mined images while the text
  tower trains (paper's SF order).
  Returns (loss, {"hn_valid": mean fraction of mined candidates kept}).
  """
  logits, positives = hard_negative_logits(queries, candidates, mined, temperature, mined_valid,
                                           in_batch_negatives)
  loss = jnp.mean(row_cross_entropy(logits, positives))
  if mined_valid is None:
    kept = jnp.ones((), jnp.float32)
  else:
    num_mined = mined.shape[1] if mined.ndim == 3 else mined.shape[0]
    kept = jnp.mean(jnp.broadcast_to(mined_valid, (queries.shape[0], num_mined)),
                    dtype=jnp.float32)
  return loss, {"hn_valid": kept}


def stage2_loss(student_image: jax.Array, student_text: jax.Array, teacher_image: jax.Array,
                teacher_text: jax.Array, temperature: jax.Array | float, *, tower: str = "image",
                mined_text: jax.Array | None = None, mined_text_valid: jax.Array | None = None,
                mined_image: jax.Array | None = None, mined_image_valid: jax.Array | None = None,
                teacher_temperature: jax.Array | float | None = None,
                kd_temperature: jax.Array | float = 1.0, in_batch_negatives: bool = True,
                infonce_weight: float | jax.Array = 1.0, kl_weight: float | jax.Array = 1.0,
                contrastive_weight: float | jax.Array = 1.0, hn_weight: float | jax.Array = 1.0
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """§3.2.2, the stage-2 objective L = L_t2v + L_v2t + L_KD + L_HN with a weight per term:

    L = infonce_weight * (L_t2v + L_v2t)                      eq. 1, `infonce_loss` (student)
      + kl_weight * (KL_i2t + KL_t2i)                          KD 1, `matching_kl_loss`
      + contrastive_weight * L_intra                           KD 2, eq. 2/3 against T'
      + hn_weight * (L_HN^v2t + L_HN^t2v)                      HN, `hard_negative_loss`

  student_image, student_text: [N, D] the student's pairs, (f_v^S, f_t^S); under SF the fixed
  tower is the teacher's (image stage: student_text = f_t^T'(x), teacher_text equal to it).
  teacher_image, teacher_text: [N, D] from the fine-tuned teacher (f_v^T', f_t^T'), stop_gradient.
  temperature: the student's tau (all terms); teacher_temperature, kd_temperature: the KL's.
  tower: the tower being fine-tuned, whose eq. 2/3 term enters L_intra: "image" (f_v^S vs
  f_v^T', SF's first step), "text" (f_t^S vs f_t^T'), "both" (the sum; Table 2's "w/o SF").
  mined_text: [N, k, D] or [M, D] mined texts for the image queries (paper: while training f_v^S),
  mined_image: mined images for the text queries; each with its valid mask (see
  `hard_negative_logits`); L_HN sums the directions given (none given: no HN term, and hn_weight
  is not read). Ablations: "w/o KD" kl_weight = contrastive_weight = 0, "w/o HN" hn_weight = 0
  (or no mined), "w/o KD+HN" all three 0. A term of weight 0 is still computed and reported.
  Returns (loss, {"infonce", "infonce_v2t", "infonce_t2v", "kd_kl", "kd_kl_i2t", "kd_kl_t2i",
  "kd_contrastive", "kd_contrastive_image" / "_text" (by tower), and with mined negatives "hn",
  "hn_v2t" / "hn_t2v", "hn_valid_v2t" / "hn_valid_t2v"}): the terms unweighted.
  """
  if tower not in TOWERS:
    raise ValueError(f"stage2_loss: tower={tower!r} must be one of {TOWERS} (the tower being "
                     "fine-tuned: 'image' then 'text' in the paper's SF; 'both' is w/o SF)")
  chex.assert_rank([student_image, student_text, teacher_image, teacher_text], 2)
  chex.assert_equal_shape([student_image, student_text, teacher_image, teacher_text])
  tau = jnp.asarray(temperature)

  infonce, parts = infonce_loss(student_image, student_text, tau)
  parts = {"infonce": infonce, **parts}
  kl, kl_parts = matching_kl_loss(student_image, student_text, teacher_image, teacher_text, tau,
                                  teacher_temperature, kd_temperature)
  parts.update(kd_kl=kl, **kl_parts)
  contrastive = jnp.zeros((), infonce.dtype)
  for name, student, teacher in (("image", student_image, teacher_image),
                                 ("text", student_text, teacher_text)):
    if tower in (name, "both"):
      term = intra_modal_contrastive_loss(student, teacher, tau)[0]
      parts[f"kd_contrastive_{name}"] = term
      contrastive = contrastive + term
  parts["kd_contrastive"] = contrastive
  loss = infonce_weight * infonce + kl_weight * kl + contrastive_weight * contrastive

  hn_terms = []
  for direction, queries, candidates, mined, valid in (
      ("v2t", student_image, student_text, mined_text, mined_text_valid),
      ("t2v", student_text, student_image, mined_image, mined_image_valid)):
    if mined is None:
      continue
    term, hn_parts = hard_negative_loss(queries, candidates, mined, tau, valid,
                                        in_batch_negatives)
    parts[f"hn_{direction}"], parts[f"hn_valid_{direction}"] = term, hn_parts["hn_valid"]
    hn_terms.append(term)
  if hn_terms:
    parts["hn"] = sum(hn_terms[1:], hn_terms[0])
    loss = loss + hn_weight * parts["hn"]
  return loss, parts
