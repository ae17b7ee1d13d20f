"""Karpathy-protocol recall without the similarity matrix (`retrieval.EmbeddingScores`): the same
gold ranks, recalls and re-ranked recalls as the dense matrix for block sizes that divide
nothing, with exact ties and NaN embeddings; host memory of one block, not the matrix; and the
CLIP_benchmark-format JSON written beside eval.json, from a hand-worked case."""

import json
import tracemalloc

import numpy as np
import pytest

from jaxdistill.config import base_config
from jaxdistill.evaluate.report import clip_benchmark_result
from jaxdistill.evaluate.rerank import rerank_recall
from jaxdistill.evaluate.retrieval import (EmbeddingScores, gold_ranks, recall_at_k,
                                           similarity_matrix)
from jaxdistill.evaluate.run import write_eval_results

BLOCKS = (1, 7, 50, 333, 1 << 22)     # scores per query block; 1: one query at a time


def embeddings(seed, n_img, n_txt, dim, integer=False):
  """img [n_img, dim], txt [n_txt, dim] float32 and caption_to_image int32 [n_txt] (every image
  has >= 1 caption, in shuffled order). integer: entries in {-1, 0, 1} (exact scores, many ties)."""
  rng = np.random.default_rng(seed)
  draw = ((lambda shape: rng.integers(-1, 2, shape)) if integer
          else (lambda shape: rng.normal(size=shape)))
  c2i = rng.permutation(np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_txt - n_img)]))
  return (np.asarray(draw((n_img, dim)), np.float32), np.asarray(draw((n_txt, dim)), np.float32),
          c2i.astype(np.int32))


def brute_ranks(sim, c2i):
  """Pessimistic 0-based gold ranks by sorting each query's candidates by (-score, gold last),
  NaN as -inf."""
  sim = np.where(np.isnan(sim), -np.inf, sim.astype(np.float64))
  out = {}
  for direction, scores in (("i2t", sim), ("t2i", sim.T)):
    ranks = []
    for q, row in enumerate(scores):
      gold = (c2i == q) if direction == "i2t" else (np.arange(len(row)) == c2i[q])
      order = np.lexsort((gold, -row))
      ranks.append(int(np.flatnonzero(gold[order])[0]))
    out[direction] = np.array(ranks)
  return out


@pytest.mark.parametrize("integer", [False, True])
def test_chunked_ranks_equal_dense_for_any_block(integer):
  img, txt, c2i = embeddings(0, 23, 97, 6, integer)
  dense = similarity_matrix(img, txt)
  want = gold_ranks(dense, c2i)
  reference = brute_ranks(dense, c2i)
  for direction in ("i2t", "t2i"):
    np.testing.assert_array_equal(want[direction], reference[direction])
  if integer:   # ties with the gold score really occur and are pessimistic
    assert (want["t2i"] > 0).mean() > 0.5
  scores = EmbeddingScores(img, txt)
  for block in BLOCKS:
    got = gold_ranks(scores, c2i, block_elements=block)
    for direction in ("i2t", "t2i"):
      np.testing.assert_array_equal(got[direction], want[direction], err_msg=f"{direction} {block}")
    assert recall_at_k(scores, c2i, ks=(1, 3, 10), block_elements=block) == \
        recall_at_k(dense, c2i, ks=(1, 3, 10))


def test_blocks_are_the_dense_matrix():
  img, txt, _ = embeddings(1, 11, 40, 8)
  scores = EmbeddingScores(img, txt)
  dense = similarity_matrix(img, txt)
  assert scores.shape == (11, 40)
  np.testing.assert_array_equal(scores[3:8], dense[3:8])
  np.testing.assert_array_equal(scores[:, 5:39], dense[:, 5:39])
  np.testing.assert_array_equal(scores[9:100], dense[9:])         # clipped like numpy
  np.testing.assert_allclose(dense, img.astype(np.float64) @ txt.T, rtol=1e-5, atol=1e-5)


def test_nan_embeddings_rank_last_as_in_the_dense_path():
  img, txt, c2i = embeddings(2, 9, 30, 5)
  img[4] = np.nan             # every score of image 4 is NaN
  txt[[0, 17]] = np.nan       # and every score of captions 0 and 17
  dense = similarity_matrix(img, txt)
  want = gold_ranks(dense, c2i)
  for block in (1, 13, 1000):
    got = gold_ranks(EmbeddingScores(img, txt), c2i, block_elements=block)
    for direction in ("i2t", "t2i"):
      np.testing.assert_array_equal(got[direction], want[direction])
  # Image 4's best gold is -inf: every other caption ranks ahead of it.
  assert want["i2t"][4] == 30 - (c2i == 4).sum()


def test_rerank_from_embedding_blocks_equals_dense():
  img, txt, c2i = embeddings(3, 12, 50, 4, integer=True)
  cross = np.random.default_rng(4).normal(size=(12, 50))
  scorer = lambda i, t: cross[i, t]
  want, _ = rerank_recall(similarity_matrix(img, txt), c2i, scorer, k=5, pair_batch_size=16)
  for block in (1, 37, 1 << 22):
    got, _ = rerank_recall(EmbeddingScores(img, txt), c2i, scorer, k=5, pair_batch_size=16,
                           block_elements=block)
    assert got == want


def _host_peak(fn) -> int:
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_memory_is_one_block_not_the_matrix():
  """Host allocations (tracemalloc: numpy buffers) of the chunked recall over 300 x 3,000 stay
  a small fraction of the 3.6 MB matrix the dense path allocates."""
  img, txt, c2i = embeddings(5, 300, 3000, 16)
  scores = EmbeddingScores(img, txt)
  recall_at_k(scores, c2i, block_elements=30_000)      # compile the block shapes first
  matrix = 300 * 3000 * 4
  chunked = _host_peak(lambda: recall_at_k(scores, c2i, block_elements=30_000))
  dense = _host_peak(lambda: recall_at_k(similarity_matrix(img, txt), c2i, block_elements=30_000))
  assert dense >= matrix, dense
  assert chunked < matrix / 4, chunked


def test_rejects_what_it_cannot_read():
  img, txt, c2i = embeddings(6, 4, 9, 3)
  scores = EmbeddingScores(img, txt)
  with pytest.raises(TypeError, match="rows sim"):
    scores[1]
  with pytest.raises(TypeError, match="rows sim"):
    scores[0:2, 1:3]
  with pytest.raises(TypeError, match="contiguous"):
    scores[::2]
  with pytest.raises(ValueError, match="same D"):
    EmbeddingScores(img, txt[:, :2])
  with pytest.raises(ValueError, match="block_elements"):
    recall_at_k(scores, c2i, block_elements=0)


# ---- CLIP_benchmark format ----

# Hand-worked: 2 images, captions 0, 1 of image 0 and 2, 3 of image 1.
#   i2t: image 0's best gold 0.9 beats 0.8, 0.2 -> rank 0; image 1's 0.85 beats 0.3, 0.7 -> 0.
#   t2i: caption 0: 0.9 > 0.3 -> 0; caption 1: 0.1 < 0.7 -> 1; caption 2: 0.85 > 0.8 -> 0;
#        caption 3: 0.5 > 0.2 -> 0.  R@1: i2t 2/2, t2i 3/4; R@2 (= R@5, R@10): all hits.
_HAND_SIM = np.array([[0.9, 0.1, 0.8, 0.2],
                      [0.3, 0.7, 0.85, 0.5]], np.float32)
_HAND_C2I = np.array([0, 0, 1, 1], np.int32)


def test_clip_benchmark_result_hand_worked():
  metrics = recall_at_k(_HAND_SIM, _HAND_C2I)
  assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 75.0
  out = clip_benchmark_result(metrics, dataset="d", model="m", pretrained="p")
  assert out == {"dataset": "d", "model": "m", "pretrained": "p", "task": "zeroshot_retrieval",
                 "language": "en",
                 "metrics": {"image_retrieval_recall@1": 0.75, "image_retrieval_recall@5": 1.0,
                             "image_retrieval_recall@10": 1.0, "text_retrieval_recall@1": 1.0,
                             "text_retrieval_recall@5": 1.0, "text_retrieval_recall@10": 1.0}}
  with pytest.raises(KeyError, match="t2i_r20"):
    clip_benchmark_result(metrics, dataset="d", model="m", pretrained="p", ks=(1, 20))


def test_write_eval_results_puts_clip_benchmark_json_beside(tmp_path):
  config = base_config("tiny")
  results = {"split": "val", "dataset": "compositional_val",
             "dual": recall_at_k(_HAND_SIM, _HAND_C2I), "step": 8}
  write_eval_results(str(tmp_path), "eval_val.json", results, config, step=8)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_benchmark_val.json", "eval_val.json"]
  written = json.loads((tmp_path / "eval_val.json").read_text())
  origin = written.pop("provenance")
  assert written == results
  assert origin["step"] == 8 and origin["checkpoint"] == f"{tmp_path}/checkpoints/8"
  assert origin["data"]["seed"] == config.data.seed and len(origin["config_sha256"]) == 64
  assert origin["jaxdistill_version"] and "git_commit" in origin
  clip = json.loads((tmp_path / "clip_benchmark_val.json").read_text())
  assert clip["dataset"] == "jaxdistill/compositional_val"
  assert clip["model"] == "dual:vit+transformer"
  assert clip["pretrained"] == f"{tmp_path}@step8"
  assert clip["metrics"]["image_retrieval_recall@1"] == 0.75
  assert clip["metrics"]["text_retrieval_recall@1"] == 1.0
  with pytest.raises(ValueError, match="eval"):
    write_eval_results(str(tmp_path), "results.json", results, config, step=8)
