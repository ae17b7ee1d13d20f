"""Paper 004's self-supervised knowledge distillation L_kd (§3.4): contrastive distillation from a
frozen self-supervised image teacher (BEiTv2's [I_CLS]) with a MoCo memory bank of teacher keys.

Owns: the KD logits of student queries against the teacher's keys (current batch + bank) with
the key mask, the row-wise KD InfoNCE, and L_kd = L_kd^image + L_kd^text on one device. The
paper's objective is min L_cl + L_kd (§3.4): L_cl is the ITC loss of §3.3 (`contrastive.py`).

Notation (§3.4): h = the [CLS] output of the shared layer, [B, D]; f_p the projection head, one
linear layer shared by both modalities; z_v^s = ||f_p(h_v)||_2 and z_w^s = ||f_p(h_w)||_2 the
student's L2-normalised image / text features, z_v^t the teacher's L2-normalised [I_CLS] of the
same images ([B, E]). `project_and_normalize` is z = ||f_p(h)||_2 written with explicit f_p
parameters; the other functions take the unit-norm features as given. The teacher's features
and the bank are under stop_gradient (the teacher is frozen): no gradient reaches them.

The bank (§3.4 "Memory Bank", MoCo, He et al. 2020; size 65536 in §3.5) is a FeatureQueue of
`parallel/queue.py` holding teacher features and their image ids: pass bank = queue.values
(teacher features, [N, E]), bank_ids = queue.ids, bank_valid = valid_mask(queue), and after the
step `enqueue(queue, z_teacher, image_ids)` (the oldest entries are overwritten). losses/ does
not import parallel/ (parallel/gather.py imports losses/: a cycle), so the id mask is written
here; it is the idea of `queue.negative_mask`.

Reading of what the paper leaves open:
(a) Direction. The KD InfoNCE is one-directional: student query -> teacher keys. The bank holds
    teacher keys only, so there is no bank of student keys for a teacher-query direction.
(b) Keys. The keys of student row r are the B teacher features of the current (global) batch,
    its positive being the teacher feature of the row's own image (column positive_columns[r];
    r itself when the rows are the whole batch), followed by the N bank entries: logits
    [R, B + N]. For z_w^s the positive is the teacher feature of the paired image ("once between
    the text representations of the student z_w^s and the image representations of the teacher").
(c) Excluded keys (logit -inf, out of the softmax):
    - an invalid bank slot (not yet filled);
    - a key whose image id equals the row's image id but which is not the row's positive column:
      another copy of the positive (a bank entry of the same image from an earlier epoch, or a
      duplicate of the image inside the batch) is no negative;
    - a bank entry whose image id is one of the current batch's (teacher_ids): it is a copy of a
      key already among the B batch columns, so the current batch's own images are never
      negatives twice (for the row of that image the previous rule excludes it as well). With
      bank = the batch's own features, the loss is the empty-bank loss.
    Not deduplicated: two batch columns of one image are both negatives of the other rows (only
    the row's own id is masked in the batch part, as in-batch contrastive losses do), and two
    bank entries of one image not in the batch are both negatives (deduplicating the bank itself
    would cost an [N, N] comparison; it happens only when N exceeds the epoch).
(d) Temperature. A fixed hyper-parameter, MoCo's 0.07 by default (`DEFAULT_TEMPERATURE`); the
    paper gives none.
(e) Sum. "We then perform the contrastive loss once between [z_v^s and z_v^t], and once between
    [z_w^s and z_v^t]": L_kd = L_kd^image + L_kd^text, a sum, each the mean over rows of
    -log softmax(logits)[r, positive_columns[r]] (the row-wise CE of contrastive.py).

Row-wise form: a device computes its R local rows (row_ids, positive_columns = the rows' global
batch indices) against the global teacher keys and the replicated bank, as contrastive.py's ITC;
the mean over devices of the local means is the global mean when every device holds R rows.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxdistill.losses.contrastive import row_cross_entropy

DEFAULT_TEMPERATURE = 0.07   # MoCo's tau (He et al. 2020); paper 004 gives no value (reading (d))


def project_and_normalize(h: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                          eps: float = 1e-12) -> jax.Array:
  """z = ||f_p(h)||_2, paper 004 §3.4: the linear projection head f_p, then L2 normalisation.

  h: [B, D] (the [CLS] of the shared layer, image or text); kernel: [D, E]; bias: [E] or None.
  Returns float32 (or wider) [B, E] with unit rows: f_p(h) / max(||f_p(h)||, sqrt(eps)), as
  models/dual.py's `l2_normalize`.
  """
  chex.assert_rank([h, kernel], 2)
  chex.assert_equal(h.shape[1], kernel.shape[0])
  dtype = jnp.promote_types(jnp.result_type(h, kernel), jnp.float32)
  x = h.astype(dtype) @ kernel.astype(dtype)
  if bias is not None:
    chex.assert_shape(bias, (kernel.shape[1],))
    x = x + bias.astype(dtype)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def kd_key_mask(row_ids: jax.Array, teacher_ids: jax.Array, bank_ids: jax.Array,
                bank_valid: jax.Array, positive_columns: jax.Array) -> jax.Array:
  """bool [R, B + N]: True where key k takes part in row r's softmax (reading (c), paper 004 §3.4).

  row_ids int [R] (image id of each student row); teacher_ids int [B] (image id of each batch
  key); bank_ids int [N]; bank_valid bool [N] (False = slot not yet filled); positive_columns
  int [R] in [0, B) (the row's positive among the batch keys).
  Batch column c: kept when c is the row's positive or teacher_ids[c] != row_ids[r].
  Bank entry j: kept when bank_valid[j], bank_ids[j] != row_ids[r] and bank_ids[j] is not among
  teacher_ids (a copy of a batch key).
  """
  chex.assert_rank([row_ids, teacher_ids, bank_ids, bank_valid, positive_columns], 1)
  chex.assert_equal_shape([row_ids, positive_columns])
  chex.assert_equal_shape([bank_ids, bank_valid])
  chex.assert_type([row_ids, teacher_ids, bank_ids, positive_columns], int)
  chex.assert_type(bank_valid, bool)
  b = teacher_ids.shape[0]
  is_positive = jnp.arange(b)[None, :] == positive_columns[:, None]               # [R, B]
  batch_keep = is_positive | (teacher_ids[None, :] != row_ids[:, None])           # [R, B]
  in_batch = jnp.any(bank_ids[:, None] == teacher_ids[None, :], axis=1)           # [N]
  bank_keep = ((bank_valid & ~in_batch)[None, :]
               & (bank_ids[None, :] != row_ids[:, None]))                         # [R, N]
  return jnp.concatenate([batch_keep, bank_keep], axis=1)


def kd_logits(student: jax.Array, teacher: jax.Array, bank: jax.Array, row_ids: jax.Array,
              teacher_ids: jax.Array, bank_ids: jax.Array, bank_valid: jax.Array,
              positive_columns: jax.Array, temperature: jax.Array | float) -> jax.Array:
  """KD logits of student queries against teacher keys, paper 004 §3.4 (readings (a)-(c)).

  student: [R, E] unit-norm rows (z_v^s or z_w^s; R = the local rows, the whole batch on one
    device); teacher: [B, E] unit-norm z_v^t of the global batch; bank: [N, E] teacher features
    of earlier steps (N may be 0); row_ids int [R], teacher_ids int [B], bank_ids int [N],
    bank_valid bool [N], positive_columns int [R] in [0, B) (see `kd_key_mask`);
    temperature: scalar tau > 0 (reading (d)).
  Returns logits [R, B + N] (float32 or wider): <student_r, key_k> / tau for the batch keys
  then the bank entries, -inf where `kd_key_mask` excludes the key. teacher and bank are under
  stop_gradient.
  """
  chex.assert_rank([student, teacher, bank], 2)
  chex.assert_equal(student.shape[1], teacher.shape[1])
  chex.assert_equal(student.shape[1], bank.shape[1])
  chex.assert_equal(teacher.shape[0], teacher_ids.shape[0])
  chex.assert_equal(bank.shape[0], bank_ids.shape[0])
  chex.assert_equal(student.shape[0], row_ids.shape[0])
  temperature = jnp.asarray(temperature)
  chex.assert_rank(temperature, 0)
  teacher, bank = jax.lax.stop_gradient((teacher, bank))
  dtype = jnp.promote_types(student.dtype, jnp.float32)   # bf16 -> f32; f32 / f64 unchanged
  keys = jnp.concatenate([teacher.astype(dtype), bank.astype(dtype)], axis=0)   # [B + N, E]
  logits = student.astype(dtype) @ keys.T / temperature.astype(dtype)
  keep = kd_key_mask(row_ids, teacher_ids, bank_ids, bank_valid, positive_columns)
  return jnp.where(keep, logits, -jnp.inf)


def kd_contrastive_loss(student: jax.Array, teacher: jax.Array, bank: jax.Array,
                        row_ids: jax.Array, teacher_ids: jax.Array, bank_ids: jax.Array,
                        bank_valid: jax.Array, positive_columns: jax.Array,
                        temperature: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One KD InfoNCE term of paper 004 §3.4 (L_kd^image or L_kd^text) on R rows.

  Arguments as `kd_logits`. loss = mean over rows r of -log softmax(logits)[r, positive_columns[r]]
  (contrastive.py's `row_cross_entropy`); the positive is never excluded, so every row is finite
  (a row whose other keys are all excluded has loss 0 and gradient 0).
  Returns (loss [], {"negatives": mean number of keys per row left as negatives}).
  """
  chex.assert_type(positive_columns, int)
  logits = kd_logits(student, teacher, bank, row_ids, teacher_ids, bank_ids, bank_valid,
                     positive_columns, temperature)
  loss = jnp.mean(row_cross_entropy(logits, positive_columns))
  negatives = jnp.sum(logits > -jnp.inf, axis=1) - 1
  return loss, {"negatives": jnp.mean(negatives.astype(loss.dtype))}


def unimodal_kd_loss(z_image: jax.Array, z_text: jax.Array, z_teacher: jax.Array,
                     bank: jax.Array, image_ids: jax.Array, bank_ids: jax.Array,
                     bank_valid: jax.Array, temperature: jax.Array | float = DEFAULT_TEMPERATURE
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_kd of paper 004 §3.4 on one device / the unsharded batch (reading (e)).

  z_image: [B, E] = z_v^s, z_text: [B, E] = z_w^s (student, unit-norm; row i of both is pair i);
  z_teacher: [B, E] = z_v^t of the same images (unit-norm, frozen); bank: [N, E] teacher
  features of earlier steps; image_ids int [B]; bank_ids int [N]; bank_valid bool [N];
  temperature: scalar tau (MoCo's 0.07 by default, reading (d)).
  Rows = the batch, positive_columns = arange(B), teacher_ids = image_ids; the text rows carry
  the id of their paired image, so both terms share one key mask.
  Returns (L_kd^image + L_kd^text, {"kd_image": L_kd^image, "kd_text": L_kd^text,
  "kd_negatives": mean negatives per row}).
  """
  chex.assert_rank([z_image, z_text, z_teacher], 2)
  chex.assert_equal_shape([z_image, z_text, z_teacher])
  chex.assert_shape(image_ids, (z_image.shape[0],))
  positives = jnp.arange(z_image.shape[0], dtype=jnp.int32)
  args = (z_teacher, bank, image_ids, image_ids, bank_ids, bank_valid, positives, temperature)
  kd_image, parts = kd_contrastive_loss(z_image, *args)
  kd_text, _ = kd_contrastive_loss(z_text, *args)
  return kd_image + kd_text, {"kd_image": kd_image, "kd_text": kd_text,
                              "kd_negatives": parts["negatives"]}
