"""Dual-encoder retrieval metrics: embedding a split, the similarity matrix, and recall@K.

Owns the Karpathy-split retrieval protocol (COCO / Flickr30K; LoopITR Tables 7 and 9), with any
number of captions per image given by `caption_to_image int32 [N_txt]`:
  - image->text (i2t, "TR"): an image query is a hit at k if ANY of its captions is in its top k;
  - text->image (t2i, "IR"): a caption query is a hit at k if its image is in its top k;
  - R@sum: the sum of the six recalls (in percent).
Ties are broken pessimistically: a non-gold candidate whose score equals the best gold score
ranks ahead of it, so a constant scorer gets no credit. NaN scores rank last (as -inf).
Gold ranks are computed on blocks of queries of at most `block_elements` scores each. Given an
`EmbeddingScores` instead of a dense matrix, each block is computed from the embeddings when it is
read, so the N_img x N_txt matrix is never materialised: peak memory is O(block_elements), a few
bytes per score of a block (docs/benchmarks.md measures 5,000 x 25,010).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

DIRECTIONS = ("i2t", "t2i")
DEFAULT_BLOCK_ELEMENTS = 1 << 22   # scores per query block (16 MiB of float32; the ranking adds a
                                   # few times that in host temporaries)


def _block_scores(img_block: jax.Array, txt_block: jax.Array) -> np.ndarray:
  """<img_i, txt_j> of one block: [n, D], [t, D] device arrays -> float32 np.ndarray [n, t]."""
  return np.asarray(jnp.matmul(img_block, txt_block.T, precision=jax.lax.Precision.HIGHEST),
                    np.float32)


def _check_embeddings(img_emb: Any, txt_emb: Any, what: str) -> None:
  if np.ndim(img_emb) != 2 or np.ndim(txt_emb) != 2 or np.shape(img_emb)[1] != np.shape(txt_emb)[1]:
    raise ValueError(f"{what} needs img_emb [N, D] and txt_emb [T, D] with the same D; "
                     f"got {np.shape(img_emb)} and {np.shape(txt_emb)}")


def similarity_matrix(img_emb: Any, txt_emb: Any,
                      block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> np.ndarray:
  """Dot-product scores <img_i, txt_j>: [N, D], [T, D] -> float32 np.ndarray [N, T].

  Computed on the device in float32, in blocks of image rows (at most `block_elements` scores
  each), at HIGHEST matmul precision (TPUs otherwise multiply float32 in bfloat16 passes, which
  reorders near-ties in the ranking). The whole matrix is returned: for large splits pass an
  `EmbeddingScores` to the metrics instead.
  """
  _check_embeddings(img_emb, txt_emb, "similarity_matrix")
  num_images, num_texts = np.shape(img_emb)[0], np.shape(txt_emb)[0]
  txt = jnp.asarray(txt_emb, jnp.float32)
  rows = max(1, block_elements // max(num_texts, 1))
  out = np.empty((num_images, num_texts), np.float32)
  for start in range(0, num_images, rows):
    out[start:start + rows] = _block_scores(jnp.asarray(img_emb[start:start + rows], jnp.float32),
                                            txt)
  return out


class EmbeddingScores:
  """The [N_img, N_txt] score matrix <img_i, txt_j> of two embedding sets, never materialised.

  Reads as the dense matrix does where the metrics read it: `.shape`, `sim[a:b]` (image rows,
  float32 [b - a, N_txt]) and `sim[:, a:b]` (caption columns, float32 [N_img, b - a]); each read
  computes that block as `similarity_matrix` does (device float32, HIGHEST precision). Pass it to
  `gold_ranks`, `recall_at_k` or `rerank_recall` in place of the matrix: they read one query block
  at a time, so memory is O(block_elements) instead of O(N_img x N_txt).
  img_emb [N_img, D], txt_emb [N_txt, D]: kept on the host and on the device.
  """

  def __init__(self, img_emb: Any, txt_emb: Any):
    _check_embeddings(img_emb, txt_emb, "EmbeddingScores")
    # Host copies give the blocks' slices (no per-slice device op); device copies the other side.
    self._img_host = np.asarray(img_emb, np.float32)
    self._txt_host = np.asarray(txt_emb, np.float32)
    self._img = jnp.asarray(self._img_host)
    self._txt = jnp.asarray(self._txt_host)
    self.shape = (len(self._img_host), len(self._txt_host))

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      return _block_scores(jnp.asarray(self._img_host[self._range(index, 0)]), self._txt)
    if (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)
        and isinstance(index[1], slice)):
      return _block_scores(self._img, jnp.asarray(self._txt_host[self._range(index[1], 1)]))
    raise TypeError(f"EmbeddingScores reads image rows sim[a:b] or caption columns sim[:, a:b] "
                    f"only, got index {index!r}")

  def _range(self, index: slice, axis: int) -> slice:
    start, stop, step = index.indices(self.shape[axis])
    if step != 1:
      raise TypeError(f"EmbeddingScores reads contiguous blocks only, got step {index.step}")
    return slice(start, max(start, stop))


def embed_in_batches(fn: Callable[[dict], Any], arrays: dict[str, Any], batch_size: int) -> Any:
  """Runs `fn` (a jitted embedding fn) over a dataset in fixed-size batches.

  arrays: {name: [N, ...]} (arrays, or array-likes decoded as sliced), all with the same N; fn
  gets {name: [batch_size, ...]} and returns an
  array [batch_size, ...] or a pytree of them. The last batch is padded by repeating its last
  row (valid input, so one compiled shape and no NaNs from empty rows); padding is dropped.
  Returns np.ndarray [N, ...] (or the same pytree of them). Batch b+1 is dispatched before batch
  b is copied to the host, so the device keeps busy.
  """
  if not arrays:
    raise ValueError("embed_in_batches needs at least one input array in `arrays`")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  # An array-like with a shape (e.g. data/real/dataset.py LazyImages) is sliced, not copied.
  host = {name: a if hasattr(a, "shape") and hasattr(a, "__getitem__") else np.asarray(a)
          for name, a in arrays.items()}
  sizes = {name: a.shape[0] if len(a.shape) else None for name, a in host.items()}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(f"embed_in_batches needs arrays with one shared leading size; got {sizes}")
  num = next(iter(sizes.values()))
  if num == 0:
    raise ValueError("embed_in_batches got an empty dataset (leading size 0)")

  def batch_at(start: int) -> dict[str, np.ndarray]:
    batch = {name: np.asarray(a[start:start + batch_size]) for name, a in host.items()}
    pad = batch_size - (min(start + batch_size, num) - start)
    if pad:
      batch = {name: np.concatenate([b, np.repeat(b[-1:], pad, axis=0)])
               for name, b in batch.items()}
    return batch

  fetched, pending = [], None
  for start in range(0, num, batch_size):
    out = fn(batch_at(start))
    if pending is not None:
      fetched.append(jax.device_get(pending))
    pending = out
  fetched.append(jax.device_get(pending))
  return jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts])[:num], *fetched)


def nan_as_lowest(scores: np.ndarray) -> np.ndarray:
  """Scores with NaN replaced by -inf (so a diverged scorer ranks its NaNs last, never first)."""
  scores = np.asarray(scores)
  return np.where(np.isnan(scores), -np.inf, scores) if np.isnan(scores).any() else scores


def check_caption_to_image(sim_shape: tuple[int, ...], caption_to_image: Any) -> np.ndarray:
  """Validates sim [N_img, N_txt] against caption_to_image [N_txt]; returns it as np.int64."""
  if len(sim_shape) != 2:
    raise ValueError(f"sim must be [N_img, N_txt], got shape {sim_shape}")
  num_images, num_texts = sim_shape
  if num_images == 0:
    raise ValueError(f"sim has no image rows (shape {sim_shape}); evaluate a non-empty split")
  c2i = np.asarray(caption_to_image)
  if c2i.shape != (num_texts,) or not np.issubdtype(c2i.dtype, np.integer):
    raise ValueError(f"caption_to_image must be integer [N_txt={num_texts}] (the image index of "
                     f"each caption, i.e. each column of sim); got {c2i.dtype} {c2i.shape}")
  if num_texts and (c2i.min() < 0 or c2i.max() >= num_images):
    raise ValueError(f"caption_to_image values must index sim's {num_images} image rows; got "
                     f"range [{c2i.min()}, {c2i.max()}]")
  captionless = np.flatnonzero(np.bincount(c2i, minlength=num_images) == 0)
  if captionless.size:
    raise ValueError(f"images {captionless[:5].tolist()} (of {captionless.size}) have no caption "
                     f"in caption_to_image; drop captionless images from sim's rows")
  return c2i.astype(np.int64)


def query_blocks(sim: Any, caption_to_image: np.ndarray, direction: str,
                 block_elements: int = DEFAULT_BLOCK_ELEMENTS
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (queries [Q], scores [Q, C], gold [Q, C] bool) over blocks of queries.

  sim: [N_img, N_txt] np or jax array or `EmbeddingScores` (only one block is on the host at a
    time; at most max(block_elements, one query's candidates) scores).
  direction "i2t": queries are images, candidates texts, gold = that image's captions.
  direction "t2i": queries are texts, candidates images, gold = the caption's image.
  caption_to_image: as returned by `check_caption_to_image`. Scores have NaN as -inf.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  if block_elements < 1:
    raise ValueError(f"block_elements must be >= 1 (scores per query block), got {block_elements}")
  num_images, num_texts = sim.shape
  num_queries, num_candidates = ((num_images, num_texts) if direction == "i2t"
                                 else (num_texts, num_images))
  step = max(1, block_elements // max(num_candidates, 1))
  for start in range(0, num_queries, step):
    queries = np.arange(start, min(start + step, num_queries))
    if direction == "i2t":
      scores = np.asarray(sim[start:start + step])
      gold = caption_to_image[None, :] == queries[:, None]
    else:
      scores = np.asarray(sim[:, start:start + step]).T
      gold = np.arange(num_images)[None, :] == caption_to_image[queries][:, None]
    yield queries, nan_as_lowest(scores), gold


def first_gold_rank(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
  """0-based position of each query's first gold candidate, ties pessimistic: [Q, C] -> int [Q].

  = the number of non-gold candidates scoring >= the best gold score. A query is a hit at k iff
  its rank < k.
  """
  best_gold = np.max(np.where(gold, scores, -np.inf), axis=1, keepdims=True)
  return np.sum(~gold & (scores >= best_gold), axis=1)


def gold_ranks(sim: Any, caption_to_image: Any,
               block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> dict[str, np.ndarray]:
  """Pessimistic 0-based gold ranks: {"i2t": int [N_img], "t2i": int [N_txt]}."""
  c2i = check_caption_to_image(tuple(sim.shape), caption_to_image)
  return {direction: np.concatenate([first_gold_rank(scores, gold) for _, scores, gold
                                     in query_blocks(sim, c2i, direction, block_elements)])
          for direction in DIRECTIONS}


def check_ks(ks: tuple[int, ...]) -> None:
  """Raises ValueError unless ks are distinct positive integers (the K of R@K)."""
  if not ks or any(int(k) != k or k < 1 for k in ks) or len(set(ks)) != len(ks):
    raise ValueError(f"ks must be distinct positive integers such as (1, 5, 10), got {ks}")


def recall_from_ranks(ranks: dict[str, np.ndarray],
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
  """{"i2t_r{k}", "t2i_r{k}" for k in ks: percent of queries with rank < k; "rsum": their sum}."""
  check_ks(ks)
  metrics = {f"{direction}_r{k}": float(100.0 * np.mean(ranks[direction] < k))
             for direction in DIRECTIONS for k in ks}
  metrics["rsum"] = float(sum(metrics.values()))
  return metrics


def recall_at_k(sim: Any, caption_to_image: Any, ks: tuple[int, ...] = (1, 5, 10),
                block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> dict[str, float]:
  """Karpathy-protocol recall (percent) of a score matrix.

  sim: [N_img, N_txt] np or jax array or `EmbeddingScores`, higher = more similar;
  caption_to_image: int [N_txt]; block_elements: scores per query block (bounds memory).
  Returns {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"} (keys follow
  `ks`); a k above the number of candidates counts every query as a hit.
  """
  return recall_from_ranks(gold_ranks(sim, caption_to_image, block_elements), ks)
