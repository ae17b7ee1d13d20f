"""Retrieval over a gallery too large for a dense similarity matrix: ScaNN top-K lists, recall@K
(Karpathy protocol, as `retrieval.py`) from them, and the gap to exact search.

i2t searches a ScaNN index of the captions, t2i one of the images (parameters from
`mining/scann_index.derive_params`); the exact reference is `mining/exact.exact_top_k` (chunked,
bounded memory). A query whose gold item is not in its retrieved top-K is a miss at every k <= K.
Also reported: neighbour recall@10 (the fraction of the exact top-10 that ScaNN returns, the
usual ANN quality figure) and milliseconds per query of both searches.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from jax.sharding import Mesh

from jaxdistill.evaluate.retrieval import check_caption_to_image, check_ks, recall_from_ranks
from jaxdistill.mining.exact import exact_top_k, neighbor_recall
from jaxdistill.mining.scann_index import IndexParams, build_index, derive_params


def ranks_from_lists(ids: np.ndarray, gold_of: np.ndarray, query_gold: np.ndarray) -> np.ndarray:
  """0-based position of each query's first gold entry in its list ids [Q, K] (-1 = empty),
  gold_of[id] compared with query_gold[q]; K when absent. -> int [Q]."""
  hit = (ids >= 0) & (gold_of[np.maximum(ids, 0)] == query_gold[:, None])
  return np.where(hit.any(axis=1), hit.argmax(axis=1), ids.shape[1])


def ann_recall(img_emb: np.ndarray, txt_emb: np.ndarray, caption_to_image: np.ndarray,
               ks: tuple[int, ...] = (1, 5, 10), *, params: dict[str, IndexParams] | None = None,
               mesh: Mesh | None = None) -> dict:
  """img_emb [N, E], txt_emb [T, E], caption_to_image int [T] ->
  {"ann": recalls, "exact": recalls, "gap": exact - ann per key, "neighbor_recall@10": {i2t, t2i},
   "ms_per_query": {"ann", "exact"}, "index_params": {"captions", "images"}}.
  params: {"captions": IndexParams, "images": IndexParams} (default: derived from the sizes)."""
  check_ks(ks)
  img_emb, txt_emb = np.asarray(img_emb, np.float32), np.asarray(txt_emb, np.float32)
  c2i = check_caption_to_image((len(img_emb), len(txt_emb)), caption_to_image)
  depth = max(max(ks), 10)
  params = params or {}
  directions = {   # name: (queries, corpus, index name, gold of corpus row, gold of query)
      "i2t": (img_emb, txt_emb, "captions", c2i, np.arange(len(img_emb))),
      "t2i": (txt_emb, img_emb, "images", np.arange(len(img_emb)), c2i)}
  ranks, exact_ranks, overlap, used = {}, {}, {}, {}
  seconds = {"ann": 0.0, "exact": 0.0}
  for name, (queries, corpus, index_name, gold_of, query_gold) in directions.items():
    p = params.get(index_name) or derive_params(len(corpus), depth)
    used[index_name] = p
    index = build_index(corpus, p, depth)
    t0 = time.time()
    _, ann_ids = index.search(queries, depth)
    seconds["ann"] += time.time() - t0
    t0 = time.time()
    _, exact_ids = exact_top_k(queries, corpus, depth, mesh=mesh)
    seconds["exact"] += time.time() - t0
    ranks[name] = ranks_from_lists(ann_ids, gold_of, query_gold)
    exact_ranks[name] = ranks_from_lists(exact_ids, gold_of, query_gold)
    overlap[name] = neighbor_recall(ann_ids[:, :10], exact_ids[:, :10])
  ann, exact = recall_from_ranks(ranks, ks), recall_from_ranks(exact_ranks, ks)
  num_queries = len(img_emb) + len(txt_emb)
  return {"ann": ann, "exact": exact, "gap": {k: exact[k] - ann[k] for k in ann},
          "neighbor_recall@10": overlap,
          "ms_per_query": {k: 1000 * v / num_queries for k, v in seconds.items()},
          "index_params": {k: dataclasses.asdict(v) for k, v in used.items()}}
