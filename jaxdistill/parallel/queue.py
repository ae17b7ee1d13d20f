"""Ring-buffer feature queue as device arrays (MoCo / ALBEF queues; CPRD paper 002 §3.1, Q^v, Q^t).

A `FeatureQueue` is a pytree of fixed-size arrays: `values` (any pytree of [N, ...] arrays, e.g.
momentum image / text features and the example indices that identify each entry), `ids` int32
[N] (the example id of each entry, for masking duplicates of a positive), `ptr` int32 [] (the
slot the next key is written to) and `count` int32 [] (how many slots hold a key, <= N).
`enqueue` is pure, so it runs inside the jitted train step and the queue is saved and restored
with the TrainState like any other leaf.

Differences from ALBEF's `_dequeue_and_enqueue`: any queue size N works (ALBEF asserts
N % batch == 0); a batch larger than the queue keeps its last N keys; `valid_mask` marks the
slots filled so far. Across devices: the queue is replicated and the keys are global jax.Arrays
(batch axis sharded on the mesh), so inside jit the scatter is one global write — the compiler
all-gathers the keys in global batch order and every device writes the same keys to the same
slots as a single device would (each key once; tests/test_queue.py checks 8 devices vs 1).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class FeatureQueue:
  """values: pytree of [N, ...] arrays; ids int32 [N]; ptr int32 []; count int32 []."""
  values: Any
  ids: jax.Array
  ptr: jax.Array
  count: jax.Array

  @property
  def size(self) -> int:
    return self.ids.shape[0]


def create_queue(size: int, specs: Any) -> FeatureQueue:
  """An empty queue of `size` slots. specs: pytree of jax.ShapeDtypeStruct (or arrays) giving
  the per-entry shape and dtype of each value, e.g. {"image": ShapeDtypeStruct((E,), f32)}."""
  if size < 1:
    raise ValueError(f"queue size {size} must be positive (set the queue size in the config "
                     "to 1 or more, or switch the queue off)")
  values = jax.tree.map(lambda s: jnp.zeros((size, *s.shape), s.dtype), specs)
  return FeatureQueue(values=values, ids=jnp.full((size,), -1, jnp.int32),
                      ptr=jnp.zeros((), jnp.int32), count=jnp.zeros((), jnp.int32))


def enqueue(queue: FeatureQueue, keys: Any, ids: jax.Array) -> FeatureQueue:
  """Writes a batch of B keys at slots ptr, ptr+1, ... (mod N), oldest entries overwritten.

  keys: pytree matching queue.values, leaves [B, ...]; ids: int [B]. When B > N only the last
  N keys are kept (in order). Returns the new queue; ptr advances by B (mod N), count by
  min(B, N - count)."""
  n = queue.size
  leaves = jax.tree.leaves(keys)
  b = ids.shape[0]
  chex.assert_tree_shape_prefix(keys, (b,))
  if jax.tree.structure(keys) != jax.tree.structure(queue.values):
    raise ValueError(f"enqueue: keys have structure {jax.tree.structure(keys)}, the queue holds "
                     f"{jax.tree.structure(queue.values)}; pass keys with the queue's fields")
  for key, slot in zip(leaves, jax.tree.leaves(queue.values)):
    if key.shape[1:] != slot.shape[1:]:
      raise ValueError(f"enqueue: key shape {key.shape[1:]} per entry does not match the "
                       f"queue's {slot.shape[1:]}")
  ptr = queue.ptr
  if b > n:   # only the last n keys survive; they land where a full write would put them
    keys = jax.tree.map(lambda k: k[b - n:], keys)
    ids = ids[b - n:]
    ptr = (ptr + (b - n)) % n
    b = n
  slots = (ptr + jnp.arange(b, dtype=jnp.int32)) % n          # distinct: b <= n
  values = jax.tree.map(lambda q, k: q.at[slots].set(k.astype(q.dtype)),
                        queue.values, keys)
  return FeatureQueue(values=values,
                      ids=queue.ids.at[slots].set(ids.astype(jnp.int32)),
                      ptr=(ptr + b) % n,
                      count=jnp.minimum(queue.count + b, n))


def valid_mask(queue: FeatureQueue) -> jax.Array:
  """bool [N]: True for slots holding a key (slots fill 0, 1, ... so the first `count`)."""
  return jnp.arange(queue.size) < queue.count


def age(queue: FeatureQueue) -> jax.Array:
  """int32 [N]: 0 for the most recently written slot, 1 for the one before, ... (N - 1 oldest).
  `age < M` selects the M most recent entries (CPRD's cross-encoder queue Q_c of size N_c)."""
  return (queue.ptr - 1 - jnp.arange(queue.size, dtype=jnp.int32)) % queue.size


def negative_mask(query_ids: jax.Array, key_ids: jax.Array,
                  key_valid: jax.Array | None = None) -> jax.Array:
  """bool [R, N]: True where key j may serve as a negative of query r — the key is valid and its
  id differs from the query's (ALBEF's idx masking: another copy of the positive is no negative).
  query_ids int [R], key_ids int [N], key_valid bool [N] or None (all valid)."""
  chex.assert_rank([query_ids, key_ids], 1)
  mask = query_ids[:, None] != key_ids[None, :]
  if key_valid is not None:
    chex.assert_equal_shape([key_ids, key_valid])
    mask = mask & key_valid[None, :]
  return mask
