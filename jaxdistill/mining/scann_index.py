"""ScaNN index over a corpus of embeddings: parameters derived from the corpus size, build, atomic
save / load, batched search with the query's own positives dropped.

Index (paper 000 §3.2.2 "HN" mines with an ANN index; ScaNN = Guo et al. 2020): a k-means tree
(partitioning) -> asymmetric hashing (anisotropic product quantisation, 2 dims per 16-centre
block) scores the points of the searched leaves -> the best `reorder` are re-scored exactly.

Parameter rule (`derive_params`, measured in docs/mining.md), N points, k neighbours wanted:
  num_leaves            = round(sqrt(N)), or 1 (no tree: AH over every point, then re-order)
                          below TREE_MIN_POINTS = 20k points, where a tree saves little and
                          costs recall (measured in docs/mining.md)
  num_leaves_to_search  = max(ceil(leaves_to_search_fraction * num_leaves), min(num_leaves, 8))
  training_sample_size  = min(N, max(50_000, 100 * num_leaves))  (k-means cost stays bounded)
  reorder               = max(k, min(250, max(100, 10 * k)))
  dims_per_block = 2, anisotropic_quantization_threshold = 0.2, spherical k-means tree (for
  unit-norm embeddings: without it the 1M benchmark needed 50 leaves for recall@10 0.976)
Any field set > 0 in the config's `mining.index` section overrides the derived value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile

import numpy as np

from jaxdistill.mining.exact import PAD_ID, drop_positives

META_FILE = "jaxdistill_index.json"
TREE_MIN_POINTS = 20_000


@dataclasses.dataclass(frozen=True)
class IndexParams:
  num_leaves: int
  num_leaves_to_search: int
  training_sample_size: int
  reorder: int
  dims_per_block: int = 2
  anisotropic_threshold: float = 0.2
  spherical: bool = True


def derive_params(num_points: int, k: int, *, leaves_to_search_fraction: float = 0.05,
                  overrides: dict | None = None) -> IndexParams:
  """The module docstring's rule; `overrides` {field: value}, values <= 0 ignored."""
  if num_points < 1:
    raise ValueError(f"cannot index an empty corpus (num_points={num_points})")
  if not 0.0 < leaves_to_search_fraction <= 1.0:
    raise ValueError(f"leaves_to_search_fraction={leaves_to_search_fraction} must lie in (0, 1]")
  leaves = 1 if num_points < TREE_MIN_POINTS else round(math.sqrt(num_points))
  derived = dict(
      num_leaves=leaves,
      num_leaves_to_search=max(math.ceil(leaves_to_search_fraction * leaves), min(leaves, 8)),
      training_sample_size=min(num_points, max(50_000, 100 * leaves)),
      reorder=max(k, min(250, max(100, 10 * k))))
  for name, value in (overrides or {}).items():
    if name not in {f.name for f in dataclasses.fields(IndexParams)}:
      raise ValueError(f"unknown index parameter {name!r}: use one of "
                       f"{', '.join(f.name for f in dataclasses.fields(IndexParams))}")
    if value and value > 0:
      derived[name] = value
  derived["num_leaves_to_search"] = min(derived["num_leaves_to_search"], derived["num_leaves"])
  return IndexParams(**derived)


def _scann():
  import scann   # imports TensorFlow (~5 s): only when an index is used
  return scann.scann_ops_pybind


class Index:
  """A ScaNN searcher over corpus rows 0..N-1 (dot product), with its params."""

  def __init__(self, searcher, params: IndexParams, num_points: int, dim: int):
    self.searcher, self.params, self.num_points, self.dim = searcher, params, num_points, dim

  def search(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
             reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> (scores float32 [Q, k], ids int32 [Q, k]); missing entries (-inf, -1)."""
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be [Q, {self.dim}] for this index; got {queries.shape}")
    reorder = max(k, reorder or self.params.reorder)
    ids, scores = self.searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder,
        leaves_to_search=leaves_to_search or self.params.num_leaves_to_search)
    ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
    if ids.shape[1] < k:   # a corpus smaller than k
      pad = k - ids.shape[1]
      ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=PAD_ID)
      scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    valid = (ids >= 0) & (ids < self.num_points)
    return np.where(valid, scores, -np.inf), np.where(valid, ids, PAD_ID).astype(np.int32)

  def search_excluding(self, queries: np.ndarray, k: int, query_owner: np.ndarray,
                       corpus_owner: np.ndarray, max_positives: int, **kwargs
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k whose corpus owner differs from the query's: fetches k + max_positives (the most
    corpus rows one owner has) and drops the positives. Returns (scores [Q, k], ids [Q, k])."""
    scores, ids = self.search(queries, k + max_positives, **kwargs)
    return drop_positives(ids, scores, query_owner, corpus_owner, k)


def build_index(corpus: np.ndarray, params: IndexParams, k: int = 10,
                threads: int = 0) -> Index:
  """Builds the tree + AH + reorder searcher over corpus [N, D] (dot product)."""
  corpus = np.ascontiguousarray(corpus, np.float32)
  if corpus.ndim != 2 or len(corpus) == 0:
    raise ValueError(f"build_index needs a non-empty corpus [N, D]; got {corpus.shape}")
  builder = _scann().builder(corpus, k, "dot_product")
  if threads:
    builder = builder.set_n_training_threads(threads)
  if params.num_leaves > 1:
    builder = builder.tree(num_leaves=params.num_leaves,
                           num_leaves_to_search=params.num_leaves_to_search,
                           training_sample_size=params.training_sample_size,
                           spherical=params.spherical)
  searcher = (builder.score_ah(params.dims_per_block,
                               anisotropic_quantization_threshold=params.anisotropic_threshold)
              .reorder(params.reorder).build())
  return Index(searcher, params, len(corpus), corpus.shape[1])


def save_index(index: Index, directory: str, extra_meta: dict | None = None) -> None:
  """Serialises into a temporary sibling directory, then renames it to `directory` (replacing an
  older index), so a killed save never leaves a half-written index under that name."""
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
  try:
    index.searcher.serialize(tmp, relative_path=True)
    meta = dict(params=dataclasses.asdict(index.params), num_points=index.num_points,
                dim=index.dim, **(extra_meta or {}))
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    old = None
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".old-", dir=parent)
      os.replace(directory, os.path.join(old, "index"))
    os.replace(tmp, directory)
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_index(directory: str) -> tuple[Index, dict]:
  """The index saved by `save_index` and its metadata."""
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{directory} holds no saved index ({META_FILE} missing): build it "
                            "with --mode=mine or `save_index`")
  with open(meta_path) as f:
    meta = json.load(f)
  searcher = _scann().load_searcher(directory, assets_backcompat_shim=False)
  return Index(searcher, IndexParams(**meta["params"]), meta["num_points"], meta["dim"]), meta
