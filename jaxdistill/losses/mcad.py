"""MCAD losses: multi-teacher cross-modal alignment distillation (paper 001, §3 and §4.2).

Owns the similarity distribution F_D (eq. 1) and the row-wise KL F_KL (eq. 2); the dual-stream
target and its top-k pairs (eq. 4-5); the single-stream scores of those n x k pairs (eq. 6) and
their L1 normalisation sigma (eq. 11); f_DS (eq. 15), f_SS (the sigma terms of eq. 10, alone
eq. 16) and f_MT = f_DS + f_SS (eq. 10); the integrated teacher's pair-by-pair logits (eq. 3 with
the fused features of eq. 12-13); L_MT (eq. 8), L_MT_FA (eq. 9) and the §4.2 baselines L_GT
(eq. 14), L_CLIP (eq. 15), L_ALBEF (eq. 16), L_CLIP_FA (eq. 17).

Shapes: n pairs in the batch (image l and text l match), k top-k candidates per row, e embedding
width. A distribution matrix D is carried as its logits (the argument of eq. 1's softmax, already
divided by tau): i2t [n, n] has image rows and text columns, t2i [n, n] text rows and image
columns (t2i = i2t.T for every matrix of the paper: eq. 3 "swaps the input positions").
Nothing here owns parameters or imports a model: the single-stream teacher is the recipe's apply
function (its scores come in as arrays or through a callable), and the integration module's
outputs (models/mcad_integration.py) come in as arrays.

Reading of the paper (its equations are garbled in places):
- Eq. 2, F_KL(D, D_hat) = sum_l KL(D_l || D_hat_l), writes the student's distribution first. We
  take KL(D_hat_l || D_l), the target's KL from the student: eq. 14 puts the identity matrix in
  the second slot, and KL(D_l || I_l) = sum_c D_lc log(D_lc / 0) is infinite whenever the student
  puts any mass off the diagonal, so eq. 14 is only defined as KL(target || student) (= the
  cross-entropy / InfoNCE term, Hinton's hard target as §4.2 says); we use the same direction
  for every F_KL (Hinton KD, `losses/distillation.kl_divergence`). We average over rows l
  instead of summing (every F_KL term has n rows, so the terms' relative weights are the
  paper's; the scale does not grow with the batch).
- Eq. 5 ranks D^DS; softmax is strictly increasing along a row, so we rank its logits (same
  top-k, and no ties created by rounding in the softmax).
- Eq. 6 is printed "(D^SS_{i25})"; read D^SS_{i2t}. Its two lines: row l of i2t scores
  (image l, text m) for m in P_i2t[l]; row l of t2i scores (image m, text l) for m in P_t2i[l].
- Eq. 10 is printed with an extra "(" in the second term and a trailing duplicate
  "sigma(D^SS_t2i[P_t2i]))"; read four terms: F_KL(D*_i2t, D^DS_i2t) + F_KL(D*_t2i, D^DS_t2i) +
  F_KL(sigma(D*_i2t[P_i2t]), sigma(D^SS_i2t[P_i2t])) + the same for t2i.
- D*[P] gathers the k entries of each row of the row-softmaxed D* (eq. 1); sigma divides them by
  their sum (eq. 11), which equals a softmax over the k gathered logits alone.
- Eq. 12-13 (H^SS_{m-l}, an unbalanced ")" in eq. 13): the fused features of pair (image l, text
  m) use the single-stream [CLS] of that pair, gated on when (l, m) is in P_i2t or (m, l) in P_t2i;
  so D^T, D^FAI, D^FAT are [n, n] matrices built pair by pair (`pair_logits`).
- Fig. 1's caption says D^FAT aligns "the student's image feature"; eq. 3 and 17 pair the student's
  text with the teacher's image (D^FAT = F_D(I^T, T^S, ...)); we follow the equations.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxdistill.losses.contrastive import contrastive_loss, similarity_logits
from jaxdistill.losses.distillation import kl_divergence

Logits = tuple[jax.Array, jax.Array]   # (i2t [n, n], t2i [n, n]) of one distribution matrix pair


class Targets(NamedTuple):
  """The teachers' side of eq. 10, for one batch (no gradient flows into any of it).

  ds_i2t: [n, n] float, logits of D^DS_i2t (eq. 4): I^DS T^DS^T / tau^DS (D^DS_t2i: its transpose).
  top_i2t: int32 [n, k], P_i2t (eq. 5): for image l, its k texts of highest D^DS_i2t.
  top_t2i: int32 [n, k], P_t2i: for text l, its k images of highest D^DS_t2i.
  ss_i2t: [n, k], D^SS_i2t[P_i2t] (eq. 6): P(match) of (image l, text top_i2t[l, j]), in [0, 1].
  ss_t2i: [n, k], D^SS_t2i[P_t2i]: P(match) of (image top_t2i[l, j], text l).
  The last four may be None for the losses that only read the dual-stream target (eq. 14-15, 17).
  """
  ds_i2t: jax.Array
  top_i2t: jax.Array | None = None
  top_t2i: jax.Array | None = None
  ss_i2t: jax.Array | None = None
  ss_t2i: jax.Array | None = None


# ----------------------------------------------------------------------------- eq. 1-2

def similarity_distribution(image: jax.Array, text: jax.Array,
                            temperature: jax.Array | float) -> jax.Array:
  """Eq. 1, F_D(I, T, tau) = softmax(I T^T / tau) over the last axis.

  image [n, e], text [n, e] (normalised representations); temperature scalar. Returns [n, n]
  (rows image l, columns text m; F_D(T, I, tau) is the t2i matrix). The losses below carry the
  softmax's argument (`similarity_logits`) instead, and apply the softmax inside the KL."""
  return jax.nn.softmax(similarity_logits(image, text, temperature)[0], axis=-1)


def f_kl(student_logits: jax.Array, target_logits: jax.Array) -> jax.Array:
  """Eq. 2, F_KL(D, D_hat), D = softmax(student_logits), D_hat = softmax(target_logits) by rows.

  student_logits, target_logits: [R, C], each already divided by its temperature. Returns the
  mean over rows l of KL(D_hat_l || D_l) (target first: see the module docstring; the paper sums
  over l, we average), with no gradient into the target (`kl_divergence`, tau = 1)."""
  chex.assert_rank([student_logits, target_logits], 2)
  return kl_divergence(student_logits, target_logits, 1.0)[0]


# ----------------------------------------------------------------------------- eq. 4-6, 11

def dual_stream_targets(image: jax.Array, text: jax.Array, temperature: jax.Array | float,
                        k: int | None = None) -> Targets:
  """Eq. 4-5: the dual-stream teacher's D^DS logits and, when k is given, its top-k pairs.

  image [n, e] = I^DS, text [n, e] = T^DS (the frozen teacher's normalised embeddings),
  temperature tau^DS; all under stop_gradient. Returns Targets(ds_i2t, top_i2t, top_t2i) (the
  single-stream fields None; fill them with `targets._replace(ss_i2t=..., ss_t2i=...)`)."""
  image, text, temperature = jax.lax.stop_gradient((image, text, jnp.asarray(temperature)))
  ds_i2t, _ = similarity_logits(image, text, temperature)
  if k is None:
    return Targets(ds_i2t)
  top_i2t, top_t2i = teacher_top_k(ds_i2t, k)
  return Targets(ds_i2t, top_i2t, top_t2i)


def teacher_top_k(ds_i2t: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Eq. 5, P_i2t = topK_indices(D^DS_i2t), P_t2i = topK_indices(D^DS_t2i).

  ds_i2t: [n, n] logits of D^DS_i2t (D^DS_t2i's logits are its transpose). The positive pair is
  not excluded (eq. 5 ranks whole rows). Returns (top_i2t, top_t2i), int32 [n, k] each, in
  descending order. Tie rule: equal scores rank the lower column index first
  (`jax.lax.top_k`), so a tie across the k-th place keeps the lowest indices.
  Raises ValueError unless 1 <= k <= n."""
  chex.assert_rank(ds_i2t, 2)
  n = ds_i2t.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"MCAD top-k: k={k} must be between 1 and the batch size n={n} "
                     "(paper 001 uses k = 11; lower k or raise the batch size)")
  ds_i2t = jax.lax.stop_gradient(ds_i2t).astype(jnp.float32)
  top_i2t = jax.lax.top_k(ds_i2t, k)[1]
  top_t2i = jax.lax.top_k(ds_i2t.T, k)[1]
  return top_i2t.astype(jnp.int32), top_t2i.astype(jnp.int32)


def top_k_pairs(top_i2t: jax.Array, top_t2i: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The (image, text) index pairs eq. 6 scores: (images int32 [2, n, k], texts int32 [2, n, k]).

  [0] = P_i2t's pairs (image l, text top_i2t[l, j]); [1] = P_t2i's (image top_t2i[l, j], text l).
  A pair may be in both halves (the single-stream teacher gives it the same score twice)."""
  chex.assert_equal_shape([top_i2t, top_t2i])
  rows = jnp.broadcast_to(jnp.arange(top_i2t.shape[0], dtype=jnp.int32)[:, None], top_i2t.shape)
  return (jnp.stack([rows, top_t2i]).astype(jnp.int32),
          jnp.stack([top_i2t, rows]).astype(jnp.int32))


def single_stream_scores(match_logits: jax.Array, match_index: int | None = None) -> jax.Array:
  """Eq. 6, f_SS: the single-stream teacher's positive-class match probability of each pair.

  match_logits: with match_index given, [..., 2] two-class ITM logits and P(match) =
    softmax(...)[..., match_index] (ALBEF / BLIP: match_index=1, this repo's models.cross.ITMHead:
    0); with match_index None, [...] logits of a one-logit binary head and P(match) = sigmoid
    (not the positive-class logit of a two-class head, whose probability needs the other
    logit). A probability, not a logit, so that eq. 11's L1 normalisation is defined (Appendix
    C: "between 0 and 1"; `teachers.base` match_scores returns the ITM log-odds, whose sigmoid
    is this probability).
  Returns float32 probabilities of shape [...] (e.g. [n, k]) under stop_gradient."""
  logits = jax.lax.stop_gradient(match_logits).astype(jnp.float32)
  if match_index is None:
    return jax.nn.sigmoid(logits)
  if logits.shape[-1] != 2:
    raise ValueError(f"single_stream_scores: match_index={match_index} needs two-class logits "
                     f"[..., 2], got shape {logits.shape}")
  return jax.nn.softmax(logits, axis=-1)[..., match_index]


def score_top_k_pairs(score_fn: Callable[[jax.Array, jax.Array], jax.Array], top_i2t: jax.Array,
                      top_t2i: jax.Array, match_index: int | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Eq. 6 through a callable: the single-stream teacher runs on the 2 n k top-k pairs only.

  score_fn(images int32 [2nk], texts int32 [2nk]) -> match logits [2nk] or [2nk, 2] of the pairs
  (image images[p], text texts[p]) of the batch (the recipe gathers the inputs and applies its
  frozen teacher). Returns (ss_i2t [n, k], ss_t2i [n, k]) as `single_stream_scores`."""
  images, texts = top_k_pairs(top_i2t, top_t2i)
  logits = score_fn(images.reshape(-1), texts.reshape(-1))
  expected = (images.size,) if match_index is None else (images.size, 2)
  if logits.shape != expected:
    raise ValueError(f"score_top_k_pairs: score_fn returned shape {logits.shape}, expected "
                     f"{expected} (match_index={match_index}: None for one logit per pair, the "
                     "match class of two-class ITM logits otherwise)")
  probabilities = single_stream_scores(logits, match_index).reshape(images.shape)
  return probabilities[0], probabilities[1]


def l1_normalize(scores: jax.Array) -> jax.Array:
  """Eq. 11, sigma(D)_{l,m} = D_{l,m} / sum_{v=1..k} D_{l,v} over the last axis ([n, k] -> [n, k]).

  For non-negative scores (probabilities). A row of zeros (sigma undefined) stays zero."""
  total = jnp.sum(scores, axis=-1, keepdims=True)
  return jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), 0.0)


# ----------------------------------------------------------------------------- eq. 10, 15, 16

def _check(i2t: jax.Array, t2i: jax.Array, targets: Targets):
  chex.assert_rank([i2t, t2i, targets.ds_i2t], 2)
  chex.assert_equal_shape([i2t, t2i, targets.ds_i2t])


def f_ds(i2t: jax.Array, t2i: jax.Array, targets: Targets) -> tuple[jax.Array, dict]:
  """Eq. 15, f_DS(D_i2t, D_t2i) = F_KL(D_i2t, D^DS_i2t) + F_KL(D_t2i, D^DS_t2i) (the first two
  terms of eq. 10). i2t, t2i: [n, n] logits of D*. Returns (loss, {"ds_i2t", "ds_t2i"})."""
  _check(i2t, t2i, targets)
  ds_i2t = f_kl(i2t, targets.ds_i2t)
  ds_t2i = f_kl(t2i, targets.ds_i2t.T)
  return ds_i2t + ds_t2i, {"ds_i2t": ds_i2t, "ds_t2i": ds_t2i}


def _top_k_kl(logits: jax.Array, top: jax.Array, scores: jax.Array) -> jax.Array:
  """F_KL(sigma(D*[P]), sigma(D^SS[P])) for one direction: logits [n, n] of D*, top int [n, k]
  = P, scores [n, k] = D^SS[P] (probabilities)."""
  chex.assert_equal_shape([top, scores])
  # sigma(softmax(x)[P]) = softmax(x[P]): the k gathered logits are the student's argument.
  student = jnp.take_along_axis(logits, top, axis=1)
  # softmax(log sigma(p)) = sigma(p). A zero entry of sigma(p) gets log(tiny) instead of -inf
  # (0 * -inf would be NaN): its weight in the KL is < 1e-37.
  target = jax.lax.stop_gradient(l1_normalize(scores.astype(jnp.float32)))
  target = jnp.log(jnp.maximum(target, jnp.finfo(jnp.float32).tiny))
  return f_kl(student, target)


def f_ss(i2t: jax.Array, t2i: jax.Array, targets: Targets) -> tuple[jax.Array, dict]:
  """Eq. 16 / the last two terms of eq. 10: F_KL(sigma(D_i2t[P_i2t]), sigma(D^SS_i2t[P_i2t])) +
  F_KL(sigma(D_t2i[P_t2i]), sigma(D^SS_t2i[P_t2i])). i2t, t2i: [n, n] logits of D*; targets
  with top_i2t / top_t2i / ss_i2t / ss_t2i. Returns (loss, {"ss_i2t", "ss_t2i"})."""
  _check(i2t, t2i, targets)
  if any(x is None for x in (targets.top_i2t, targets.top_t2i, targets.ss_i2t, targets.ss_t2i)):
    raise ValueError("MCAD single-stream terms (eq. 10, 16) need Targets with top_i2t, top_t2i "
                     "(dual_stream_targets(..., k)) and ss_i2t, ss_t2i (single_stream_scores)")
  ss_i2t = _top_k_kl(i2t, targets.top_i2t, targets.ss_i2t)
  ss_t2i = _top_k_kl(t2i, targets.top_t2i, targets.ss_t2i)
  return ss_i2t + ss_t2i, {"ss_i2t": ss_i2t, "ss_t2i": ss_t2i}


def f_mt(i2t: jax.Array, t2i: jax.Array, targets: Targets) -> tuple[jax.Array, dict]:
  """Eq. 10, f_MT(D*_i2t, D*_t2i) = f_DS (eq. 15) + f_SS (eq. 16), D* in {S, T, FAI, FAT}.
  i2t, t2i: [n, n] logits. Returns (loss, {"ds_i2t", "ds_t2i", "ss_i2t", "ss_t2i"})."""
  ds, ds_parts = f_ds(i2t, t2i, targets)
  ss, ss_parts = f_ss(i2t, t2i, targets)
  return ds + ss, {**ds_parts, **ss_parts}


# ----------------------------------------------------------------------------- eq. 3, 12-13, 17

def pair_logits(image: jax.Array, text: jax.Array, temperature: jax.Array | float,
                top_i2t: jax.Array, top_t2i: jax.Array,
                image_i2t: jax.Array | None = None, text_i2t: jax.Array | None = None,
                image_t2i: jax.Array | None = None, text_t2i: jax.Array | None = None) -> Logits:
  """Eq. 1 / 3 with pair-dependent features: logits[l, m] = <a_lm, b_lm> / tau.

  a_lm = image[l], b_lm = text[m] ([n, e] each) outside the gated pairs of eq. 12. On them the
  pair's own features replace them where given (None: keep image[l] / text[m]):
    pair (l, top_i2t[l, j]):  a = image_i2t[l, j], b = text_i2t[l, j]      ([n, k, e] each)
    pair (top_t2i[m, j], m):  a = image_t2i[m, j], b = text_t2i[m, j]
  A pair in both lists takes its i2t copy (both are the same pair's features).
  Returns (i2t [n, n], t2i = i2t.T): rows image l / columns text m, and the transpose."""
  chex.assert_rank([image, text, top_i2t, top_t2i], [2, 2, 2, 2])
  chex.assert_equal_shape([image, text])
  chex.assert_equal_shape([top_i2t, top_t2i])
  n, k = top_i2t.shape
  for name, x in (("image_i2t", image_i2t), ("text_i2t", text_i2t),
                  ("image_t2i", image_t2i), ("text_t2i", text_t2i)):
    if x is not None:
      chex.assert_shape(x, (n, k, image.shape[1]), custom_message=name)
  image, text = image.astype(jnp.float32), text.astype(jnp.float32)
  rows = jnp.arange(n)[:, None]
  a_i2t = image[:, None, :] if image_i2t is None else image_i2t
  b_i2t = text[top_i2t] if text_i2t is None else text_i2t
  a_t2i = image[top_t2i] if image_t2i is None else image_t2i
  b_t2i = text[:, None, :] if text_t2i is None else text_t2i
  logits = image @ text.T
  # Both index sets are duplicate-free (top-k columns are distinct); the i2t scatter goes last
  # so that a pair in both lists ends with its i2t value (and the t2i copy gets no gradient).
  logits = logits.at[top_t2i, rows].set(jnp.sum(a_t2i * b_t2i, axis=-1))
  logits = logits.at[rows, top_i2t].set(jnp.sum(a_i2t * b_i2t, axis=-1))
  logits = logits / temperature
  return logits, logits.T


def integrated_logits(student_image: jax.Array, student_text: jax.Array,
                      student_temperature: jax.Array | float, integrated,
                      top_i2t: jax.Array, top_t2i: jax.Array) -> tuple[Logits, Logits, Logits]:
  """Eq. 3 with the integration module's fused features: (D^T, D^FAI, D^FAT) logits.

  student_image, student_text: [n, e] = I^S, T^S (normalised); student_temperature tau^S.
  integrated: the 7-tuple of `models.mcad_integration.IntegrationModule` (image, text [n, e] with
    the gates closed; image_i2t, text_i2t, image_t2i, text_t2i [n, k, e] on the top-k pairs;
    temperature tau^T), its gradient kept (the module trains through eq. 8's second term and
    eq. 9).
  D^T = F_D(I^T, T^T, tau^T); D^FAI = F_D(I^S, T^T, (tau^T + tau^S) / 2); D^FAT = F_D(I^T, T^S,
  (tau^T + tau^S) / 2), each entry (l, m) with pair (l, m)'s fused features (`pair_logits`).
  Returns (teacher, fai, fat), each (i2t [n, n], t2i [n, n])."""
  image, text, image_i2t, text_i2t, image_t2i, text_t2i, tau_t = integrated
  tau_fa = (tau_t + student_temperature) / 2
  teacher = pair_logits(image, text, tau_t, top_i2t, top_t2i,
                        image_i2t, text_i2t, image_t2i, text_t2i)
  fai = pair_logits(student_image, text, tau_fa, top_i2t, top_t2i,
                    text_i2t=text_i2t, text_t2i=text_t2i)
  fat = pair_logits(image, student_text, tau_fa, top_i2t, top_t2i,
                    image_i2t=image_i2t, image_t2i=image_t2i)
  return teacher, fai, fat


def cross_alignment_logits(student_image: jax.Array, student_text: jax.Array,
                           student_temperature: jax.Array | float, teacher_image: jax.Array,
                           teacher_text: jax.Array, teacher_temperature: jax.Array | float
                           ) -> tuple[Logits, Logits]:
  """Eq. 17's D^FAI' = F_D(I^S, T^DS, tau') and D^FAT' = F_D(I^DS, T^S, tau'), tau' = (tau^DS +
  tau^S) / 2 (t2i: the transposes, F_D(T^DS, I^S, tau'), F_D(T^S, I^DS, tau')).
  [n, e] features; the teacher's features and temperature under stop_gradient.
  Returns (fai, fat), each (i2t [n, n], t2i [n, n])."""
  teacher_image, teacher_text, teacher_temperature = jax.lax.stop_gradient(
      (teacher_image, teacher_text, jnp.asarray(teacher_temperature)))
  tau = (teacher_temperature + student_temperature) / 2
  return (similarity_logits(student_image, teacher_text, tau),
          similarity_logits(teacher_image, student_text, tau))


# ----------------------------------------------------------------------------- the losses

def _prefixed(prefix: str, parts: dict) -> dict:
  return {f"{prefix}_{name}": value for name, value in parts.items()}


def gt_loss(i2t: jax.Array, t2i: jax.Array) -> tuple[jax.Array, dict]:
  """Eq. 14, L_GT = F_KL(D^S_i2t, D^GT) + F_KL(D^S_t2i, D^GT), D^GT the identity.

  KL(I_l || D_l) = -log D_ll (0 log 0 = 0), so this is the two InfoNCE cross-entropies of
  `contrastive_loss` summed (that function averages them). i2t, t2i: [n, n] logits of D^S.
  Returns (loss, {"gt_i2t", "gt_t2i"})."""
  chex.assert_equal_shape([i2t, t2i])
  _, parts = contrastive_loss(i2t, t2i, jnp.arange(i2t.shape[0], dtype=jnp.int32))
  gt_i2t, gt_t2i = parts["itc_i2t"], parts["itc_t2i"]
  return gt_i2t + gt_t2i, {"gt_i2t": gt_i2t, "gt_t2i": gt_t2i}


def clip_loss(i2t: jax.Array, t2i: jax.Array, targets: Targets) -> tuple[jax.Array, dict]:
  """Eq. 15, L_CLIP = f_DS(D^S_i2t, D^S_t2i) (TinyCLIP's affinity mimicking; Leaner-and-Faster
  adds L_GT). i2t, t2i: [n, n] logits of D^S. Returns (loss, {"clip_ds_i2t", "clip_ds_t2i"})."""
  loss, parts = f_ds(i2t, t2i, targets)
  return loss, _prefixed("clip", parts)


def albef_loss(i2t: jax.Array, t2i: jax.Array, targets: Targets) -> tuple[jax.Array, dict]:
  """Eq. 16, L_ALBEF = f_SS(D^S_i2t, D^S_t2i): the student's distribution over the dual-stream
  teacher's top-k pairs against the single-stream scores (LoopITR / Thinking-Fast-and-Slow add
  L_GT). Returns (loss, {"albef_ss_i2t", "albef_ss_t2i"})."""
  loss, parts = f_ss(i2t, t2i, targets)
  return loss, _prefixed("albef", parts)


def clip_fa_loss(fai: Logits, fat: Logits, targets: Targets) -> tuple[jax.Array, dict]:
  """Eq. 17, L_CLIP_FA = f_DS(D^FAI') + f_DS(D^FAT'), fai / fat from `cross_alignment_logits`.
  Returns (loss, {"clip_fa_fai_ds_i2t", ..., "clip_fa_fat_ds_t2i"})."""
  loss_fai, parts_fai = f_ds(*fai, targets)
  loss_fat, parts_fat = f_ds(*fat, targets)
  return loss_fai + loss_fat, {**_prefixed("clip_fa_fai", parts_fai),
                               **_prefixed("clip_fa_fat", parts_fat)}


def mt_loss(student: Logits, teacher: Logits, targets: Targets) -> tuple[jax.Array, dict]:
  """Eq. 8, L_MT = f_MT(D^S_i2t, D^S_t2i) + f_MT(D^T_i2t, D^T_t2i).

  student: (i2t, t2i) logits of D^S (e.g. `similarity_logits(I^S, T^S, tau^S)`); teacher: D^T
  from `integrated_logits` (the second term regularises the integration module).
  Returns (loss, {"mt_student_ds_i2t", ..., "mt_teacher_ss_t2i"})."""
  loss_s, parts_s = f_mt(*student, targets)
  loss_t, parts_t = f_mt(*teacher, targets)
  return loss_s + loss_t, {**_prefixed("mt_student", parts_s), **_prefixed("mt_teacher", parts_t)}


def mt_fa_loss(fai: Logits, fat: Logits, targets: Targets) -> tuple[jax.Array, dict]:
  """Eq. 9, L_MT_FA = f_MT(D^FAI_i2t, D^FAI_t2i) + f_MT(D^FAT_i2t, D^FAT_t2i), fai / fat from
  `integrated_logits` (gradient to the student and to the integration module).
  Returns (loss, {"mt_fa_fai_ds_i2t", ..., "mt_fa_fat_ss_t2i"})."""
  loss_fai, parts_fai = f_mt(*fai, targets)
  loss_fat, parts_fat = f_mt(*fat, targets)
  return loss_fai + loss_fat, {**_prefixed("mt_fa_fai", parts_fai),
                               **_prefixed("mt_fa_fat", parts_fat)}
