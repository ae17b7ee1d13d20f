"""Exact maximum-inner-product top-k over a corpus too large for one similarity matrix.

The recall reference for the ScaNN index (`scann_index.py`), its fallback, and the exact side of
`evaluate/ann.py`. Two backends compute the same lists:

  numpy (the default on a CPU backend): per (query block, corpus chunk) one float32 BLAS matmul
    into a reused [query_block, corpus_block] buffer, then a cheap exact selection: only the
    scores >= the running kk-th best (kk = the list length kept) leave the buffer and are merged
    into the running list. Where that admits too many (the first chunk), the chunk's columns are
    cut into strided groups of GROUP: the kk-th largest group maximum is a lower bound of the
    kk-th largest score and raises the threshold. One comparison pass per chunk besides the
    matmul. Memory: query_block x corpus_block scores (+ a bool mask) whatever the corpus.
  jax (the default on an accelerator): query blocks sharded over the mesh's batch axes; each block
    scans the (replicated) corpus in chunks inside one jitted `lax.scan`, merging a running top-k
    with `lax.top_k`, matmuls at HIGHEST precision (TPUs otherwise multiply float32 in bfloat16
    passes). Memory: query_block x (corpus_block + k) scores.

Why not the jax scan on a CPU: XLA's CPU matmul costs more CPU time than OpenBLAS's and the
per-chunk `top_k` over [query_block, k + corpus_block] adds a full sort-like pass per chunk;
measured side by side in `benchmarks/exact_search.py` (docs/benchmarks.md).

Order: score descending, ties broken by the smaller corpus index. Corpus rows whose owner id
equals the query's owner id (the query's own positives, e.g. the other captions of the query's
image) are never returned. NaN scores count as -inf. Entries scoring -inf, and the tail when
fewer than k candidates remain (k larger than the corpus), are id PAD_ID = -1, score -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdistill.parallel.mesh import BATCH_AXES

PAD_ID = -1
BACKENDS = ("auto", "numpy", "jax")
GROUP = 32                # numpy backend: scores per strided group (the bound's granularity)
CANDIDATES_PER_QUERY = 4  # numpy backend: more than this x kk per query in a chunk -> group bound
FETCH_PAST_MAX = 64       # owners with at most this many corpus rows: fetch k + that many, drop
                          # the positives afterwards; more: mask them inside each score block


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
    keep = valid[None, :] & (owner[None, :] != query_owner[:, None]) & ~jnp.isnan(s)
    s = jnp.where(keep, s, -jnp.inf)
    top_s, pos = jax.lax.top_k(jnp.concatenate([best_s, s], axis=1), k)
    # Positions < k are in the running list, the rest are chunk rows start + (pos - k).
    kept = jnp.take_along_axis(best_i, jnp.minimum(pos, k - 1), axis=1)
    return (top_s, jnp.where(pos < k, kept, start + pos - k), start + chunk_size), None

  init = (jnp.full((qb, k), -jnp.inf, jnp.float32), jnp.full((qb, k), PAD_ID, jnp.int32),
          jnp.zeros((), jnp.int32))
  (scores, ids, _), _ = jax.lax.scan(merge, init, (chunks, chunk_owner, chunk_valid))
  return scores, jnp.where(jnp.isneginf(scores), PAD_ID, ids)


def _jax_top_k(queries, corpus, k, q_code, c_code, mesh, query_block, corpus_block):
  """The jax backend (module docstring): (scores [Q, k], ids [Q, k]), owners masked."""
  num_q, n = len(queries), len(corpus)
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


def _merge(run_s: np.ndarray, run_i: np.ndarray, rows: np.ndarray, vals: np.ndarray,
           ids: np.ndarray) -> None:
  """Merges candidates (row, score, id) [P] into the running lists run_s / run_i [Qb, kk] (each
  row sorted by score desc, id asc) in place, keeping each row's kk best in that order."""
  touched, local = np.unique(rows, return_inverse=True)
  num, kk = len(touched), run_s.shape[1]
  all_r = np.concatenate([np.repeat(np.arange(num), kk), local])
  all_s = np.concatenate([run_s[touched].ravel(), vals])
  all_i = np.concatenate([run_i[touched].ravel(), ids])
  order = np.lexsort((all_i, -all_s, all_r))
  all_r, all_s, all_i = all_r[order], all_s[order], all_i[order]
  counts = np.bincount(all_r, minlength=num)
  position = np.arange(all_r.size) - np.repeat(np.cumsum(counts) - counts, counts)
  first = position < kk          # every row has >= kk entries (its running list)
  run_s[touched], run_i[touched] = all_s[first].reshape(num, kk), all_i[first].reshape(num, kk)


def _group_bound(buffer: np.ndarray, rows: int, cols: int, kk: int) -> np.ndarray:
  """A lower bound of each row's kk-th largest score in buffer[:rows, :cols] -> float32 [rows]:
  the kk-th largest maximum of the columns' strided groups (kk disjoint groups each hold a score
  >= it); -inf when there are fewer than kk groups. Writes -inf into the padding columns."""
  group = GROUP if cols >= GROUP * kk else 1
  padded = -(-cols // group) * group
  buffer[:rows, cols:padded] = -np.inf
  group_max = np.fmax.reduce(buffer[:rows, :padded].reshape(rows, group, -1), axis=1)
  group_max[np.isnan(group_max)] = -np.inf
  num_groups = group_max.shape[1]
  if num_groups < kk:
    return np.full(rows, -np.inf, np.float32)
  return np.partition(group_max, num_groups - kk, axis=1)[:, num_groups - kk]


def _numpy_top_k(queries, corpus, kk, q_code, c_code, mask_owners, query_block, corpus_block):
  """The numpy backend (module docstring): (scores [Q, kk], ids int64 [Q, kk]) sorted by (score
  desc, id asc), NaN as -inf; owners masked in the block only when `mask_owners`."""
  num_q, n = len(queries), len(corpus)
  qb = max(1, min(query_block, num_q))
  chunk = max(1, min(corpus_block, n))
  buffer = np.empty((qb, -(-chunk // GROUP) * GROUP), np.float32)
  mask = np.empty((qb, chunk), bool)
  out_s = np.empty((num_q, kk), np.float32)
  out_i = np.empty((num_q, kk), np.int64)
  for q0 in range(0, num_q, qb):
    block = queries[q0:q0 + qb]
    rows = len(block)
    run_s = np.full((rows, kk), -np.inf, np.float32)
    run_i = np.full((rows, kk), PAD_ID, np.int64)
    for c0 in range(0, n, chunk):
      cols = min(chunk, n - c0)
      s = buffer[:rows, :cols]
      np.matmul(block, corpus[c0:c0 + cols].T, out=s)
      if mask_owners:
        np.copyto(s, -np.inf, where=c_code[None, c0:c0 + cols] == q_code[q0:q0 + rows, None])
      # Candidates: scores >= the running kk-th best (NaN never passes: it ranks as -inf). Where
      # that lets through too many (the first chunk: nothing to beat yet), also >= the group bound.
      hit = mask[:rows, :cols]
      np.greater_equal(s, run_s[:, -1:], out=hit)
      if np.count_nonzero(hit) > CANDIDATES_PER_QUERY * kk * rows:
        bound = np.maximum(_group_bound(buffer, rows, cols, kk), run_s[:, -1])
        np.greater_equal(s, bound[:, None], out=hit)
      flat = np.flatnonzero(hit)
      if flat.size:
        r, c = np.divmod(flat, cols)
        _merge(run_s, run_i, r, s[r, c], c0 + c)
    out_s[q0:q0 + rows], out_i[q0:q0 + rows] = run_s, run_i
  return out_s, out_i


def exact_top_k(queries, corpus, k: int, *, query_owner=None, corpus_owner=None,
                mesh: Mesh | None = None, query_block: int = 1024, corpus_block: int = 16384,
                backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product.

  queries [Q, D], corpus [N, D] (float32 or castable); query_owner int [Q] and corpus_owner int
  [N] (both or neither): corpus row j is excluded for query q when corpus_owner[j] ==
  query_owner[q]. backend: "numpy" | "jax" | "auto" (numpy on a CPU backend, else jax); the
  block sizes bound memory (module docstring). mesh (jax backend): shards each query block over
  its batch axes (query_block is rounded up to a multiple of the device count). Returns (scores
  float32 [Q, k], ids int32 [Q, k]).
  """
  if backend not in BACKENDS:
    raise ValueError(f"exact_top_k backend must be one of {BACKENDS}, got {backend!r}")
  queries = np.ascontiguousarray(queries, np.float32)
  corpus = np.asarray(corpus, np.float32)
  if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
    raise ValueError(f"exact_top_k needs queries [Q, D] and corpus [N, D] with the same D; got "
                     f"{queries.shape} and {corpus.shape}")
  if k < 1:
    raise ValueError(f"exact_top_k needs k >= 1, got k={k}")
  if query_block < 1 or corpus_block < 1:
    raise ValueError(f"exact_top_k needs query_block, corpus_block >= 1; got {query_block}, "
                     f"{corpus_block}")
  if (query_owner is None) != (corpus_owner is None):
    raise ValueError("pass both query_owner and corpus_owner (to exclude positives) or neither")
  num_q, n = len(queries), len(corpus)
  owned = query_owner is not None
  if owned:
    query_owner, corpus_owner = np.asarray(query_owner), np.asarray(corpus_owner)
    if query_owner.shape != (num_q,) or corpus_owner.shape != (n,):
      raise ValueError(f"query_owner must be [{num_q}] and corpus_owner [{n}]; got "
                       f"{query_owner.shape} and {corpus_owner.shape}")
  if num_q == 0 or n == 0:
    return np.full((num_q, k), -np.inf, np.float32), np.full((num_q, k), PAD_ID, np.int32)
  if backend == "auto":
    backend = "numpy" if jax.default_backend() == "cpu" else "jax"
  if owned:   # owners compared as int32 after mapping to dense codes (ids may be int64)
    codes, inverse = np.unique(np.concatenate([query_owner, corpus_owner]), return_inverse=True)
    q_code, c_code = inverse[:num_q].astype(np.int32), inverse[num_q:].astype(np.int32)
  elif backend == "jax":   # distinct owners that never match: nothing excluded
    q_code, c_code = np.full(num_q, -1, np.int32), np.arange(n, dtype=np.int32)
  else:
    q_code = c_code = None
  if backend == "jax":
    return _jax_top_k(queries, corpus, k, q_code, c_code, mesh, query_block, corpus_block)

  # The most corpus rows any query's owner has: fetching that many more than k and dropping the
  # positives afterwards is exact (no masking pass over the scores) while it stays small.
  extra = int(np.bincount(c_code, minlength=len(codes))[q_code].max()) if owned else 0
  fetch_past = extra <= FETCH_PAST_MAX
  kk = k + extra if fetch_past else k
  scores, ids = _numpy_top_k(queries, corpus, kk, q_code, c_code, not fetch_past, query_block,
                             corpus_block)
  if owned and fetch_past:
    scores, ids = drop_positives(ids, scores, q_code, c_code, k)
  scores, ids = scores[:, :k], ids[:, :k]
  return scores, np.where(np.isneginf(scores), PAD_ID, ids).astype(np.int32)


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
