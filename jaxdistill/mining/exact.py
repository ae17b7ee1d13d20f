"""Exact maximum-inner-product top-k over a corpus too large for one similarity matrix.

The recall reference for the ScaNN index (`scann_index.py`) and its fallback. Queries go in
blocks sharded over the mesh's batch axes; each block scans the (replicated) corpus in fixed-size
chunks inside one jitted `lax.scan`, merging a running top-k, so memory is bounded by
query_block x (corpus_block + k) scores whatever the corpus size.

Order: score descending, ties broken by the smaller corpus index (`lax.top_k` keeps the
lower index first among equals, and the running list always holds smaller indices than the
chunk merged into it). Corpus rows whose owner id equals the query's owner id (the query's own
positives, e.g. the other captions of the query's image) are never returned. When fewer than k
candidates remain (k larger than the corpus), the tail is padded with id -1 and score -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdistill.parallel.mesh import BATCH_AXES

PAD_ID = -1


@functools.partial(jax.jit, static_argnames=("k",))
def _scan_corpus(queries, query_owner, chunks, chunk_owner, chunk_valid, k):
  """queries [Qb, D], query_owner [Qb]; chunks [nc, C, D], chunk_owner / chunk_valid [nc, C]
  -> (scores [Qb, k], ids [Qb, k]) over all chunks (ids are row indices into the flat corpus)."""
  chunk_size = chunks.shape[1]
  qb = queries.shape[0]

  def merge(carry, chunk):
    best_s, best_i, start = carry
    rows, owner, valid = chunk
    s = jnp.matmul(queries, rows.T, precision=jax.lax.Precision.HIGHEST)       # [Qb, C]
    keep = valid[None, :] & (owner[None, :] != query_owner[:, None])
    s = jnp.where(keep, s, -jnp.inf)
    top_s, pos = jax.lax.top_k(jnp.concatenate([best_s, s], axis=1), k)
    # Positions < k are in the running list, the rest are chunk rows start + (pos - k).
    kept = jnp.take_along_axis(best_i, jnp.minimum(pos, k - 1), axis=1)
    return (top_s, jnp.where(pos < k, kept, start + pos - k), start + chunk_size), None

  init = (jnp.full((qb, k), -jnp.inf, jnp.float32), jnp.full((qb, k), PAD_ID, jnp.int32),
          jnp.zeros((), jnp.int32))
  (scores, ids, _), _ = jax.lax.scan(merge, init, (chunks, chunk_owner, chunk_valid))
  return scores, jnp.where(jnp.isneginf(scores), PAD_ID, ids)


def exact_top_k(queries, corpus, k: int, *, query_owner=None, corpus_owner=None,
                mesh: Mesh | None = None, query_block: int = 1024,
                corpus_block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product.

  queries [Q, D], corpus [N, D] (float32 or castable); query_owner int [Q] and corpus_owner int
  [N] (both or neither): corpus row j is excluded for query q when corpus_owner[j] ==
  query_owner[q]. mesh: shards each query block over its batch axes (query_block is rounded up
  to a multiple of the device count). Returns (scores float32 [Q, k], ids int32 [Q, k]).
  """
  queries = np.asarray(queries, np.float32)
  corpus = np.asarray(corpus, np.float32)
  if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
    raise ValueError(f"exact_top_k needs queries [Q, D] and corpus [N, D] with the same D; got "
                     f"{queries.shape} and {corpus.shape}")
  if k < 1:
    raise ValueError(f"exact_top_k needs k >= 1, got k={k}")
  if (query_owner is None) != (corpus_owner is None):
    raise ValueError("pass both query_owner and corpus_owner (to exclude positives) or neither")
  num_q, n = len(queries), len(corpus)
  if query_owner is None:   # distinct owners that never match: nothing excluded
    query_owner, corpus_owner = np.full(num_q, -1, np.int64), np.arange(n, dtype=np.int64)
  query_owner, corpus_owner = np.asarray(query_owner), np.asarray(corpus_owner)
  if query_owner.shape != (num_q,) or corpus_owner.shape != (n,):
    raise ValueError(f"query_owner must be [{num_q}] and corpus_owner [{n}]; got "
                     f"{query_owner.shape} and {corpus_owner.shape}")
  # Owners compared as int32 after mapping to dense codes (ids may be int64).
  _, inverse = np.unique(np.concatenate([query_owner, corpus_owner]), return_inverse=True)
  q_code, c_code = inverse[:num_q].astype(np.int32), inverse[num_q:].astype(np.int32)

  chunk = max(1, min(corpus_block, n))
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  if mesh is None:
    put = put_replicated = jnp.asarray
  else:
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
    put_replicated = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
  chunks = put_replicated(np.pad(corpus, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1))
  chunk_owner = put_replicated(np.pad(c_code, (0, pad)).reshape(num_chunks, chunk))
  chunk_valid = put_replicated((np.arange(num_chunks * chunk) < n).reshape(num_chunks, chunk))

  devices = mesh.size if mesh is not None else 1
  qb = -(-min(query_block, max(num_q, 1)) // devices) * devices
  scores = np.empty((num_q, k), np.float32)
  ids = np.empty((num_q, k), np.int32)
  for start in range(0, num_q, qb):
    block = queries[start:start + qb]
    owner = q_code[start:start + qb]
    rows = len(block)
    if rows < qb:   # one compiled shape: pad the last block, drop the padding afterwards
      block = np.pad(block, ((0, qb - rows), (0, 0)))
      owner = np.pad(owner, (0, qb - rows))
    s, i = _scan_corpus(put(block), put(owner), chunks, chunk_owner, chunk_valid, k)
    scores[start:start + rows] = np.asarray(s)[:rows]
    ids[start:start + rows] = np.asarray(i)[:rows]
  return scores, ids


def drop_positives(ids: np.ndarray, scores: np.ndarray, query_owner: np.ndarray,
                   corpus_owner: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Filters a retrieved list [Q, K'] (ids -1 = empty) to the first k entries whose owner differs
  from the query's, keeping order; pads with (-1, -inf). Returns (scores [Q, k], ids [Q, k])."""
  ids = np.asarray(ids)
  owner = np.where(ids >= 0, np.asarray(corpus_owner)[np.maximum(ids, 0)], np.iinfo(np.int64).min)
  keep = (ids >= 0) & (owner != np.asarray(query_owner)[:, None])
  # Stable sort puts kept entries first in their original order.
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  kept = np.take_along_axis(keep, order, axis=1)
  out_ids = np.where(kept, np.take_along_axis(ids, order, axis=1), PAD_ID).astype(np.int32)
  out_scores = np.where(kept, np.take_along_axis(np.asarray(scores, np.float32), order, axis=1),
                        -np.inf).astype(np.float32)
  if out_ids.shape[1] < k:
    extra = k - out_ids.shape[1]
    out_ids = np.pad(out_ids, ((0, 0), (0, extra)), constant_values=PAD_ID)
    out_scores = np.pad(out_scores, ((0, 0), (0, extra)), constant_values=-np.inf)
  return out_scores, out_ids


def neighbor_recall(approx: np.ndarray, exact: np.ndarray) -> float:
  """Mean over queries of |approx row ∩ exact row| / |exact row| (ids -1 ignored)."""
  hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max((e >= 0).sum(), 1)
          for a, e in zip(approx, exact)]
  return float(np.mean(hits))
