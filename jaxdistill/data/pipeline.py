"""Host input pipeline for the compositional benchmark: the grain training stream (batches of
whole look-alike / swap groups, checkpointable), the full evaluation arrays, and assembly of
process-local batches into global jax.Arrays sharded on the mesh's data axis."""

from __future__ import annotations

import chex
import grain
import jax
import numpy as np

from jaxdistill.data.compositional import CompositionalSplit, normalize_images
from jaxdistill.data.negatives import MISSING, TrainingNegatives, caption_ids

# Batches are computed on the fly from in-memory arrays: one worker thread, a short look-ahead.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def _group_table(split: CompositionalSplit, group_size: int) -> np.ndarray:
  """Example indices int [G, group_size] of each group (group_size 1: every example alone)."""
  n = len(split.image_ids)
  if group_size == 1:
    return np.arange(n)[:, None]
  _, inverse, counts = np.unique(split.group_ids, return_inverse=True, return_counts=True)
  if np.any(counts != group_size):
    raise ValueError(f"group_size={group_size} does not match the split's groups (sizes "
                     f"{sorted(set(counts.tolist()))}); use the group_size the benchmark was "
                     "built with, or 1 for plain shuffling")
  return np.argsort(inverse, kind="stable").reshape(len(counts), group_size)


def train_dataset(split: CompositionalSplit, token_ids: np.ndarray, token_mask: np.ndarray, *,
                  global_batch_size: int, group_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1,
                  negatives: TrainingNegatives | None = None,
                  extra_tokens: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> grain.IterDataset:
  """Infinite stream of this process's share of each global training batch.

  token_ids, token_mask: int32 [N, 5, L] (every caption of every image). Global batch k of epoch
  e = k // steps_per_epoch is global_batch_size // group_size whole groups from a permutation of
  the groups seeded by (seed, e) (the permutation's tail that fills no whole batch sits that
  epoch out); each example takes one of its captions drawn from (seed, e, example index).
  Process p gets examples [p * b, (p + 1) * b) of the global batch, b = global_batch_size //
  process_count, so the global batch does not depend on the process count. Elements: image
  float32 [b, 56, 56, 1] (normalised), text_ids / text_mask int32 [b, L], image_id / group_id
  int32 [b], caption_index int32 [b] (which of the image's captions text_ids is). With
  `negatives` (mined banks, paper 000 §3.2.2 HN) each example also carries its k
  hard negatives (see `_hard_negative_fields`). extra_tokens {name: (ids, mask) int32
  [N, 5, L_name]}: the same captions in another vocabulary (a teacher's), as <name>_text_ids /
  <name>_text_mask [b, L_name]. Iterators support get_state() / set_state()."""
  n = len(split.image_ids)
  chex.assert_shape(token_ids, (n, None, None))
  chex.assert_equal_shape([token_ids, token_mask])
  if global_batch_size % group_size or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of group_size="
                     f"{group_size} and of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
  groups = _group_table(split, group_size)
  groups_per_batch = global_batch_size // group_size
  steps_per_epoch = len(groups) // groups_per_batch
  if steps_per_epoch == 0:
    raise ValueError(f"global_batch_size={global_batch_size} exceeds the {n} training examples; "
                     "lower --config.batch_size or raise --config.data.num_train")
  local = global_batch_size // process_count
  captions_per_image = token_ids.shape[1]

  def make_batch(step: int, _) -> dict[str, np.ndarray]:
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(groups))
    chosen = order[position * groups_per_batch:(position + 1) * groups_per_batch]
    examples = groups[chosen].reshape(-1)[process_index * local:(process_index + 1) * local]
    caption = np.random.default_rng([seed, epoch, 1]).integers(captions_per_image, size=n)
    batch = {"image": normalize_images(split.images[examples]),
             "text_ids": token_ids[examples, caption[examples]],
             "text_mask": token_mask[examples, caption[examples]],
             "image_id": split.image_ids[examples],
             "caption_index": caption[examples].astype(np.int32),
             "group_id": split.group_ids[examples]}
    for name, (ids, mask) in (extra_tokens or {}).items():
      batch[f"{name}_text_ids"] = ids[examples, caption[examples]]
      batch[f"{name}_text_mask"] = mask[examples, caption[examples]]
    if negatives is not None:
      batch.update(_hard_negative_fields(negatives, split, token_ids, token_mask, examples,
                                         caption[examples]))
    return batch

  return (grain.MapDataset.range(steps_per_epoch).repeat()
          .map_with_index(make_batch).to_iter_dataset(_READ_OPTIONS))


def _hard_negative_fields(negatives: TrainingNegatives, split: CompositionalSplit,
                          token_ids: np.ndarray, token_mask: np.ndarray, examples: np.ndarray,
                          slots: np.ndarray) -> dict[str, np.ndarray]:
  """The k banked negatives of each example (the first k of the bank, so a batch depends on
  the step alone and resume stays exact): neg_text_ids / neg_text_mask int32 [b, k, L] and
  neg_text_owner int32 [b, k] (the image id of each negative caption), neg_image float32
  [b, k, 56, 56, 1] and neg_image_owner int32 [b, k]. Entries missing from the bank or outside
  this split get owner -1 (and example 0's data) and are masked out of the loss."""
  k, per_image = negatives.k, negatives.captions_per_image
  sorter = np.argsort(split.image_ids)
  sorted_ids = split.image_ids[sorter]

  def positions(ids):   # image ids [...] -> (split index, valid)
    at = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
    valid = (ids != MISSING) & (sorted_ids[at] == ids)
    return np.where(valid, sorter[at], 0), valid

  image_ids = split.image_ids[examples]
  text_neg, _ = negatives.i2t.lookup(image_ids, k)                     # caption ids [b, k]
  text_owner = np.where(text_neg == MISSING, MISSING, text_neg // per_image)
  text_at, text_ok = positions(text_owner)
  text_slot = np.where(text_ok, text_neg % per_image, 0)
  image_neg, _ = negatives.t2i.lookup(caption_ids(image_ids, slots, per_image), k)  # [b, k]
  image_at, image_ok = positions(image_neg)
  return {"neg_text_ids": token_ids[text_at, text_slot],
          "neg_text_mask": token_mask[text_at, text_slot],
          "neg_text_owner": np.where(text_ok, text_owner, MISSING).astype(np.int32),
          "neg_image": normalize_images(split.images[image_at.reshape(-1)]).reshape(
              *image_at.shape, *split.images.shape[1:], 1),
          "neg_image_owner": np.where(image_ok, image_neg, MISSING).astype(np.int32)}


def eval_arrays(split: CompositionalSplit, token_ids: np.ndarray,
                token_mask: np.ndarray) -> dict[str, np.ndarray]:
  """Whole split for evaluation: image float32 [N, 56, 56, 1] (normalised), text_ids / text_mask
  int32 [N*5, L] (image-major: captions of image i are rows 5i..5i+4), caption_to_image
  int32 [N*5]."""
  n, per_image, length = token_ids.shape
  chex.assert_shape(split.images, (n, None, None))
  chex.assert_equal_shape([token_ids, token_mask])
  return {"image": normalize_images(split.images),
          "text_ids": token_ids.reshape(n * per_image, length),
          "text_mask": token_mask.reshape(n * per_image, length),
          "caption_to_image": np.repeat(np.arange(n, dtype=np.int32), per_image)}


def to_global_batch(batch: dict[str, np.ndarray],
                    shardings: dict[str, jax.sharding.NamedSharding]) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays [process_count * b, ...], each field
  placed with its sharding (the trainer's "batch/<field>" rules: batch dimension over the
  data axes)."""
  return {name: jax.make_array_from_process_local_data(shardings[name], value)
          for name, value in batch.items()}


def global_batch_spec(batch: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the global batch assembled from this process's `batch`."""
  n = jax.process_count()
  return {name: jax.ShapeDtypeStruct((n * v.shape[0], *v.shape[1:]), v.dtype)
          for name, v in batch.items()}
