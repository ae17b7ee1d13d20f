"""Cross-encoder re-ranking of the dual encoder's top-k (LoopITR Table 13 and footnote 2, as ALBEF).

Owns choosing each query's top-k candidates by the dual-encoder scores, scoring the
deduplicated (image, text) pairs with the caller's cross encoder in fixed-size chunks, and the
Karpathy-protocol recalls of the re-ranked orderings (same pessimistic tie rule as
`retrieval.py`). Each query's top-k is re-ordered by the cross score (score="cross", LoopITR's
wording) or by the cross score plus the dual-encoder score (score="cross+dual": what ALBEF's and
BLIP's evaluation code computes, `score_matrix[i, topk_idx] = itm_logit + topk_sim`, and ALBEF is
the protocol LoopITR's footnote 2 cites); candidates outside the top-k keep their dual-encoder
order after it, so R@k for k <= top-k can only change by re-ordering within the top-k.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from jaxdistill.config import RERANK_SCORES
from jaxdistill.evaluate.retrieval import (DEFAULT_BLOCK_ELEMENTS, DIRECTIONS,
                                           check_caption_to_image, check_ks, first_gold_rank,
                                           nan_as_lowest, query_blocks, recall_from_ranks)

# score_pairs(image_index int32 [P], text_index int32 [P]) -> scores [P]
PairScorer = Callable[[np.ndarray, np.ndarray], Any]


def pessimistic_top_k(scores: np.ndarray, gold: np.ndarray, k: int) -> np.ndarray:
  """Candidate indices of each query's k highest scores: [Q, C], [Q, C] bool -> int [Q, k].

  Ties at the k-th score are filled with non-gold candidates first (then by lower index), so a
  gold candidate enters the top-k iff its pessimistic rank (`first_gold_rank`) is < k. Unordered.
  """
  num_candidates = scores.shape[1]
  kth_score = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
  tie_order = np.where(gold, num_candidates, 0) + np.arange(num_candidates)
  key = np.where(scores > kth_score, -1,
                 np.where(scores == kth_score, tie_order, 2 * num_candidates))
  # copy: a view would keep the whole [Q, C] block alive.
  return np.argpartition(key, k - 1, axis=1)[:, :k].copy()


def _score_in_chunks(image_index: np.ndarray, text_index: np.ndarray, score_pairs: PairScorer,
                     pair_batch_size: int,
                     progress: Callable[[int, int], None] | None) -> np.ndarray:
  """score_pairs over [P] pairs in chunks of exactly `pair_batch_size` -> float64 [P].

  The last chunk is padded by repeating its first pair; the padded scores are dropped.
  """
  total = image_index.size
  scores = np.empty(total, np.float64)
  for start in range(0, total, pair_batch_size):
    img = image_index[start:start + pair_batch_size].astype(np.int32)
    txt = text_index[start:start + pair_batch_size].astype(np.int32)
    real = img.size
    pad = pair_batch_size - real
    if pad:
      img, txt = np.concatenate([img, np.full(pad, img[0], np.int32)]), np.concatenate(
          [txt, np.full(pad, txt[0], np.int32)])
    chunk = np.asarray(score_pairs(img, txt))
    if chunk.shape != (pair_batch_size,):
      raise ValueError(f"score_pairs must return one score per pair, shape ({pair_batch_size},); "
                       f"got {chunk.shape}")
    scores[start:start + real] = chunk[:real]
    if progress is not None:
      progress(start + real, total)
  return scores


def rerank_recall(sim: Any, caption_to_image: Any, score_pairs: PairScorer, k: int = 16,
                  pair_batch_size: int = 1024, ks: tuple[int, ...] = (1, 5, 10),
                  progress: Callable[[int, int], None] | None = None,
                  block_elements: int = DEFAULT_BLOCK_ELEMENTS, score: str = "cross"
                  ) -> tuple[dict[str, float], dict[str, float]]:
  """Recall after re-ranking each query's dual-encoder top-k with a cross encoder.

  sim: [N_img, N_txt] dual-encoder scores (np or jax array, or `retrieval.EmbeddingScores`:
    read one query block of at most `block_elements` scores at a time);
  caption_to_image: int [N_txt].
  score_pairs(image_index int32 [P], text_index int32 [P]) -> [P]: the cross encoder's
    positive-class logit of each pair (the caller closes over the precomputed token sequences);
    always called with P = pair_batch_size, so a jitted scorer compiles once.
  k: candidates re-ranked per query (LoopITR Table 13: 16), capped at the number of candidates.
  progress: optional callback(pairs_done, pairs_total) after each chunk.
  score: "cross" (the cross score alone) | "cross+dual" (plus the pair's `sim`, ALBEF's sum).
  A pair in both a text query's and an image query's top-k is scored once. NaN scores rank last.

  Returns (metrics, timing). metrics: the keys of `recall_at_k`. timing: "seconds" (selection +
  scoring), "pairs_requested" (k per query, both directions), "pairs_scored" (after dedup),
  "ms_per_query" (seconds over all N_img + N_txt queries), and "i2t_ms_per_query" /
  "t2i_ms_per_query" (one query of that direction alone at the measured seconds per pair).
  """
  start_time = time.perf_counter()
  if k < 1:
    raise ValueError(f"rerank k must be >= 1, got {k}")
  if pair_batch_size < 1:
    raise ValueError(f"pair_batch_size must be >= 1, got {pair_batch_size}")
  if score not in RERANK_SCORES:
    raise ValueError(f"rerank score {score!r} is not valid: use one of {', '.join(RERANK_SCORES)}")
  check_ks(ks)
  c2i = check_caption_to_image(tuple(sim.shape), caption_to_image)
  num_images, num_texts = sim.shape

  dual_ranks, top, top_dual = {}, {}, {}
  for direction in DIRECTIONS:
    num_candidates = num_texts if direction == "i2t" else num_images
    k_dir = min(k, num_candidates)
    ranks, tops, dual = [], [], []
    for _, scores, gold in query_blocks(sim, c2i, direction, block_elements):
      ranks.append(first_gold_rank(scores, gold))
      tops.append(pessimistic_top_k(scores, gold, k_dir))
      dual.append(np.take_along_axis(np.asarray(scores, np.float64), tops[-1], axis=1))
    dual_ranks[direction], top[direction] = np.concatenate(ranks), np.concatenate(tops)
    top_dual[direction] = np.concatenate(dual)

  # Pair id = image * N_txt + text, for both directions' candidates.
  i2t_ids = np.arange(num_images)[:, None] * num_texts + top["i2t"]
  t2i_ids = top["t2i"] * num_texts + np.arange(num_texts)[:, None]
  requested = np.concatenate([i2t_ids.ravel(), t2i_ids.ravel()])
  unique_ids, inverse = np.unique(requested, return_inverse=True)
  unique_scores = nan_as_lowest(_score_in_chunks(unique_ids // num_texts, unique_ids % num_texts,
                                                 score_pairs, pair_batch_size, progress))
  cross = unique_scores[inverse]
  cross_by_direction = {"i2t": cross[:i2t_ids.size].reshape(i2t_ids.shape),
                        "t2i": cross[i2t_ids.size:].reshape(t2i_ids.shape)}
  if score == "cross+dual":
    cross_by_direction = {d: cross_by_direction[d] + top_dual[d] for d in DIRECTIONS}
  gold_by_direction = {"i2t": c2i[top["i2t"]] == np.arange(num_images)[:, None],
                       "t2i": top["t2i"] == c2i[:, None]}

  reranked = {}
  for direction in DIRECTIONS:
    gold = gold_by_direction[direction]
    reranked[direction] = np.where(gold.any(axis=1),
                                   first_gold_rank(cross_by_direction[direction], gold),
                                   dual_ranks[direction])
  seconds = time.perf_counter() - start_time
  seconds_per_pair = seconds / unique_ids.size
  timing = {"seconds": seconds,
            "pairs_requested": int(requested.size),
            "pairs_scored": int(unique_ids.size),
            "ms_per_query": 1000.0 * seconds / (num_images + num_texts),
            "i2t_ms_per_query": 1000.0 * seconds_per_pair * top["i2t"].shape[1],
            "t2i_ms_per_query": 1000.0 * seconds_per_pair * top["t2i"].shape[1]}
  return recall_from_ranks(reranked, ks), timing
