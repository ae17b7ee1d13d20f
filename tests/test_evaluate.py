"""Retrieval recall@K, cross-encoder re-ranking, the binding probe and reports, against hand-worked
values and brute-force re-implementations of the Karpathy protocol written here."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.atomic import write_json_atomic
from jaxdistill.evaluate.binding import binding_accuracy
from jaxdistill.evaluate.report import format_table
from jaxdistill.evaluate.rerank import rerank_recall
from jaxdistill.evaluate.retrieval import (embed_in_batches, gold_ranks, recall_at_k,
                                           similarity_matrix)


# ---- brute-force references: sort every query's candidates, then find the first gold ----

def _first_gold_position(order, is_gold):
  return next(pos for pos, c in enumerate(order) if is_gold(c))


def _brute_ranks(sim, c2i, cross=None, k=None):
  """Pessimistic ranks by full sorts; with `cross`, the top k re-ordered by cross, rest after."""
  n_img, n_txt = sim.shape
  ranks = {"i2t": [], "t2i": []}
  for direction, num_q, num_c in (("i2t", n_img, n_txt), ("t2i", n_txt, n_img)):
    for q in range(num_q):
      score = (lambda c: sim[q, c]) if direction == "i2t" else (lambda c: sim[c, q])
      cscore = (lambda c: cross[q, c]) if direction == "i2t" else (lambda c: cross[c, q])
      is_gold = (lambda c: c2i[c] == q) if direction == "i2t" else (lambda c: c == c2i[q])
      order = sorted(range(num_c), key=lambda c: (-score(c), is_gold(c), c))
      if cross is not None:
        order = sorted(order[:k], key=lambda c: (-cscore(c), is_gold(c))) + order[k:]
      ranks[direction].append(_first_gold_position(order, is_gold))
  return {d: np.array(r) for d, r in ranks.items()}


def _brute_recall(ranks, ks=(1, 5, 10)):
  out = {f"{d}_r{k}": 100.0 * np.mean(ranks[d] < k) for d in ("i2t", "t2i") for k in ks}
  out["rsum"] = sum(out.values())
  return out


def _random_case(seed, n_img=7, n_txt=17, ties=False):
  rng = np.random.default_rng(seed)
  c2i = rng.permutation(np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_txt - n_img)]))
  sim = rng.normal(size=(n_img, n_txt))
  if ties:
    sim = np.round(sim * 2) / 2   # few distinct values -> many ties, including with the gold
  return sim.astype(np.float32), c2i.astype(np.int32)


def _assert_metrics_equal(got, expected):
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], atol=1e-9, err_msg=key)


# ---- recall_at_k ----

# 3 images x 6 captions, captions 2i and 2i+1 belong to image i.
_HAND_C2I = np.array([0, 0, 1, 1, 2, 2], np.int32)
_HAND_SIM = np.array([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],
                      [0.5, 0.9, 0.1, 0.7, 0.8, 0.3],
                      [0.6, 0.7, 0.5, 0.9, 0.2, 0.1]], np.float32)


def test_recall_hand_worked_ranks():
  # i2t: image 0's best caption 0.9 beats all; image 1's best 0.7 is behind 0.9, 0.8 -> rank 2;
  # image 2's best 0.2 is behind 0.6, 0.7, 0.5, 0.9 -> rank 4.
  # t2i columns: t0 [.9 .5 .6] gold 0 -> 0; t1 [.1 .9 .7] -> 2; t2 [.8 .1 .5] gold 1 -> 2;
  # t3 [.2 .7 .9] -> 1; t4 [.3 .8 .2] gold 2 -> 2; t5 [.4 .3 .1] -> 2.
  ranks = gold_ranks(_HAND_SIM, _HAND_C2I)
  np.testing.assert_array_equal(ranks["i2t"], [0, 2, 4])
  np.testing.assert_array_equal(ranks["t2i"], [0, 2, 2, 1, 2, 2])
  metrics = recall_at_k(_HAND_SIM, _HAND_C2I, ks=(1, 2, 3))
  _assert_metrics_equal(metrics, {"i2t_r1": 100 / 3, "i2t_r2": 100 / 3, "i2t_r3": 200 / 3,
                                  "t2i_r1": 100 / 6, "t2i_r2": 200 / 6, "t2i_r3": 100.0,
                                  "rsum": 100 / 3 + 100 / 3 + 200 / 3 + 100 / 6 + 200 / 6 + 100})


def test_recall_default_keys_and_k_above_candidates():
  metrics = recall_at_k(_HAND_SIM, _HAND_C2I)
  _assert_metrics_equal(metrics, {"i2t_r1": 100 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0,
                                  "t2i_r1": 100 / 6, "t2i_r5": 100.0, "t2i_r10": 100.0,
                                  "rsum": 100 / 3 + 100 / 6 + 400})
  assert recall_at_k(_HAND_SIM, _HAND_C2I, ks=(50,))["t2i_r50"] == 100.0


def test_one_retrieved_caption_of_five_is_an_i2t_hit():
  c2i = np.repeat(np.arange(2), 5).astype(np.int32)
  sim = np.full((2, 10), 0.5, np.float32)
  sim[0, :5] = [0.0, 0.0, 0.0, 0.9, 0.0]    # only caption 3 of image 0 beats the others' 0.5
  sim[1, 5:] = [0.1, 0.1, 0.1, 0.1, 0.95]   # only caption 9 of image 1 does
  metrics = recall_at_k(sim, c2i, ks=(1,))
  assert metrics["i2t_r1"] == 100.0
  # t2i: only captions 3 and 9 have their image strictly on top; the rest tie or lose.
  assert metrics["t2i_r1"] == pytest.approx(100 * 2 / 10)


def test_ties_are_pessimistic():
  c2i = np.array([0, 0, 1, 1, 2, 2], np.int32)
  metrics = recall_at_k(np.ones((3, 6), np.float32), c2i)
  # constant scores: every non-gold ties the gold and ranks ahead (4 non-gold texts, 2 images).
  assert metrics["i2t_r1"] == 0.0 and metrics["t2i_r1"] == 0.0
  assert metrics["i2t_r5"] == 100.0 and metrics["t2i_r5"] == 100.0
  one_image = recall_at_k(np.ones((1, 3), np.float32), np.zeros(3, np.int32))
  assert one_image["i2t_r1"] == 100.0 and one_image["t2i_r1"] == 100.0
  tied_with_one = np.array([[1.0, 1.0], [0.0, 1.0]], np.float32)   # image 0's gold ties caption 1
  ranks = gold_ranks(tied_with_one, np.array([0, 1], np.int32))
  np.testing.assert_array_equal(ranks["i2t"], [1, 0])
  np.testing.assert_array_equal(ranks["t2i"], [0, 1])


def test_nan_scores_rank_last():
  sim = np.eye(2, dtype=np.float32)
  sim[0, 0] = np.nan
  metrics = recall_at_k(sim, np.array([0, 1], np.int32), ks=(1,))
  assert metrics["i2t_r1"] == 50.0 and metrics["t2i_r1"] == 50.0


@pytest.mark.parametrize("ties", [False, True])
def test_recall_matches_brute_force(ties):
  sim, c2i = _random_case(seed=int(ties), ties=ties)
  expected = _brute_recall(_brute_ranks(sim, c2i), ks=(1, 2, 5, 30))
  _assert_metrics_equal(recall_at_k(sim, c2i, ks=(1, 2, 5, 30)), expected)
  # small blocks: several query blocks per direction, same answer.
  _assert_metrics_equal(recall_at_k(sim, c2i, ks=(1, 2, 5, 30), block_elements=20), expected)


def test_recall_accepts_jax_arrays():
  sim, c2i = _random_case(seed=3, ties=True)
  _assert_metrics_equal(recall_at_k(jnp.asarray(sim), jnp.asarray(c2i), block_elements=40),
                        recall_at_k(sim, c2i))


def test_recall_input_errors():
  with pytest.raises(ValueError, match="caption_to_image"):
    recall_at_k(_HAND_SIM, _HAND_C2I[:5])
  with pytest.raises(ValueError, match="no caption"):
    recall_at_k(_HAND_SIM, np.array([0, 0, 1, 1, 1, 1], np.int32))
  with pytest.raises(ValueError, match="index sim"):
    recall_at_k(_HAND_SIM, np.array([0, 0, 1, 1, 2, 3], np.int32))
  with pytest.raises(ValueError, match="ks"):
    recall_at_k(_HAND_SIM, _HAND_C2I, ks=(0, 5))


# ---- similarity_matrix, embed_in_batches ----

def test_similarity_matrix_matches_numpy_in_blocks():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32)
  sim = similarity_matrix(img, txt, block_elements=14)   # 2 rows per block -> 3 blocks
  assert sim.shape == (5, 7) and sim.dtype == np.float32
  np.testing.assert_allclose(sim, img.astype(np.float64) @ txt.T.astype(np.float64), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="same D"):
    similarity_matrix(img, txt[:, :2])


def test_embed_in_batches_pads_to_one_shape_and_drops_padding():
  a = np.arange(20, dtype=np.float32).reshape(10, 2)
  b = np.arange(10, dtype=np.float32)
  seen = []

  def fn(batch):
    seen.append({k: v.copy() for k, v in batch.items()})
    return batch["a"] * 2, batch["a"].sum(-1) + batch["b"]

  doubled, summed = embed_in_batches(fn, {"a": a, "b": b}, batch_size=4)
  assert [s["a"].shape for s in seen] == [(4, 2)] * 3 and [s["b"].shape for s in seen] == [(4,)] * 3
  np.testing.assert_array_equal(seen[-1]["a"], a[[8, 9, 9, 9]])   # padded with the last real row
  np.testing.assert_array_equal(doubled, a * 2)
  np.testing.assert_array_equal(summed, a.sum(-1) + b)
  single = embed_in_batches(lambda batch: batch["a"][:, 0], {"a": a}, batch_size=16)
  np.testing.assert_array_equal(single, a[:, 0])
  with pytest.raises(ValueError, match="leading size"):
    embed_in_batches(fn, {"a": a, "b": b[:9]}, batch_size=4)


# ---- rerank_recall ----

def _scorer_from_matrix(cross, calls=None):
  def score_pairs(img_idx, txt_idx):
    if calls is not None:
      calls.append((img_idx.copy(), txt_idx.copy()))
    return cross[img_idx, txt_idx]
  return score_pairs


def test_rerank_with_perfect_cross_encoder():
  sim, c2i = _random_case(seed=4, n_img=12, n_txt=24)
  perfect = (c2i[None, :] == np.arange(12)[:, None]).astype(np.float32)
  k = 3
  metrics, _ = rerank_recall(sim, c2i, _scorer_from_matrix(perfect), k=k, pair_batch_size=8)
  dual_ranks = _brute_ranks(sim, c2i)
  dual = _brute_recall(dual_ranks)
  for d in ("i2t", "t2i"):
    assert 0 < np.mean(dual_ranks[d] < k) < 1   # some golds inside the top-k, some outside
    # every gold inside the top-k moves to rank 0; the others stay where they were (rank >= k).
    assert metrics[f"{d}_r1"] == pytest.approx(100 * np.mean(dual_ranks[d] < k))
    assert metrics[f"{d}_r1"] > dual[f"{d}_r1"]
    assert metrics[f"{d}_r5"] == pytest.approx(dual[f"{d}_r5"])
    assert metrics[f"{d}_r10"] == pytest.approx(dual[f"{d}_r10"])


def test_rerank_with_dual_scores_equals_recall_at_k():
  sim, c2i = _random_case(seed=5, ties=True)   # ties at the k-th score exercise the selection
  for k in (1, 3, 20):
    metrics, _ = rerank_recall(sim, c2i, _scorer_from_matrix(sim), k=k, pair_batch_size=16,
                               block_elements=30)
    _assert_metrics_equal(metrics, recall_at_k(sim, c2i))


@pytest.mark.parametrize("ties", [False, True])
def test_rerank_matches_brute_force(ties):
  sim, c2i = _random_case(seed=6, ties=ties)
  cross = np.random.default_rng(7).normal(size=sim.shape)
  if ties:
    cross = np.round(cross)
  metrics, _ = rerank_recall(sim, c2i, _scorer_from_matrix(cross), k=4, pair_batch_size=10)
  _assert_metrics_equal(metrics, _brute_recall(_brute_ranks(sim, c2i, cross=cross, k=4)))


def test_rerank_cross_plus_dual_is_albefs_sum():
  """score="cross+dual": each top-k candidate is re-ordered by cross + sim (ALBEF / BLIP's
  itm_logit + topk_sim): the brute-force ranking of that sum; a constant cross score then leaves
  the dual ranking as it is, and an unknown score name is refused."""
  sim, c2i = _random_case(seed=6)
  cross = np.random.default_rng(7).normal(size=sim.shape)
  metrics, _ = rerank_recall(sim, c2i, _scorer_from_matrix(cross), k=4, pair_batch_size=10,
                             score="cross+dual")
  _assert_metrics_equal(metrics, _brute_recall(_brute_ranks(sim, c2i, cross=cross + sim, k=4)))
  alone, _ = rerank_recall(sim, c2i, _scorer_from_matrix(cross), k=4, pair_batch_size=10)
  assert alone != metrics
  constant, _ = rerank_recall(sim, c2i, _scorer_from_matrix(np.full(sim.shape, 3.0)), k=4,
                              pair_batch_size=10, score="cross+dual")
  _assert_metrics_equal(constant, recall_at_k(sim, c2i))
  with pytest.raises(ValueError, match="rerank score"):
    rerank_recall(sim, c2i, _scorer_from_matrix(cross), k=4, score="dual")


def test_rerank_scores_each_pair_once_in_fixed_chunks():
  sim, c2i = _random_case(seed=8)   # continuous scores: the top-k sets are unambiguous
  n_img, n_txt = sim.shape
  k, batch = 4, 16
  top_i2t = np.argsort(-sim, axis=1)[:, :k]
  top_t2i = np.argsort(-sim, axis=0)[:k, :]
  wanted = ({(i, int(t)) for i in range(n_img) for t in top_i2t[i]} |
            {(int(i), t) for t in range(n_txt) for i in top_t2i[:, t]})
  assert len(wanted) < n_img * k + n_txt * k   # the two directions do share pairs
  calls, progress = [], []
  _, timing = rerank_recall(sim, c2i, _scorer_from_matrix(sim, calls), k=k, pair_batch_size=batch,
                            progress=lambda done, total: progress.append((done, total)))
  assert all(i.shape == (batch,) and t.shape == (batch,) and i.dtype == np.int32
             and t.dtype == np.int32 for i, t in calls)
  assert len(calls) == -(-len(wanted) // batch)
  scored = list(zip(np.concatenate([i for i, _ in calls]).tolist(),
                    np.concatenate([t for _, t in calls]).tolist()))[:len(wanted)]
  assert len(set(scored)) == len(scored) and set(scored) == wanted
  assert timing["pairs_scored"] == len(wanted)
  assert timing["pairs_requested"] == n_img * k + n_txt * k
  assert {"seconds", "ms_per_query", "i2t_ms_per_query", "t2i_ms_per_query"} <= timing.keys()
  assert progress[-1] == (len(wanted), len(wanted))
  assert [done for done, _ in progress] == sorted(done for done, _ in progress)


def test_rerank_rejects_wrong_scorer_output():
  with pytest.raises(ValueError, match="one score per pair"):
    rerank_recall(_HAND_SIM, _HAND_C2I, lambda i, t: np.zeros((len(i), 2)), k=2, pair_batch_size=4)


# ---- binding probe ----

def test_binding_accuracy_hand_cases():
  assert binding_accuracy([3.0, 3.0], [1.0, 2.0]) == 100.0
  # 1 > 0 right; 2 = 2 tie -> wrong; 3 < 4 wrong; NaN -> wrong.
  assert binding_accuracy(np.array([1.0, 2.0, 3.0, 5.0]), np.array([0.0, 2.0, 4.0, np.nan])) == 25.0
  assert binding_accuracy(np.zeros(4), np.zeros(4)) == 0.0
  with pytest.raises(ValueError, match="same non-empty shape"):
    binding_accuracy(np.zeros(3), np.zeros(4))


# ---- reports ----

def test_format_table_rows_and_missing_values():
  full = {"i2t_r1": 100 / 3, "i2t_r5": 90.0, "i2t_r10": 95.25, "t2i_r1": 12.0, "t2i_r5": 50.0,
          "t2i_r10": 60.0, "rsum": 440.58, "binding": 75.0, "query_ms": 0.1234}
  partial = {k: v for k, v in full.items() if k not in ("binding", "query_ms")}
  lines = format_table({"dual": full, "dual+rerank@16": partial}).splitlines()
  assert len(lines) == 4 and len({len(line) for line in lines}) == 1   # aligned columns
  assert lines[0].split()[:3] == ["system", "i2t", "R@1"] and "binding %" in lines[0]
  assert lines[2].split() == ["dual", "33.3", "90.0", "95.2", "12.0", "50.0", "60.0", "440.6",
                              "75.0", "0.123"]
  assert lines[3].split()[0] == "dual+rerank@16" and lines[3].split()[-2:] == ["-", "-"]


def test_write_json_atomic_replaces_and_leaves_no_temp(tmp_path):
  path = tmp_path / "eval.json"
  write_json_atomic(str(path), {"a": np.float32(1.5), "b": np.arange(3), "c": jnp.ones(2)})
  assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": [1.0, 1.0]}
  inode = os.stat(path).st_ino
  write_json_atomic(str(path), {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  assert os.stat(path).st_ino != inode   # a new file was renamed over it, not rewritten in place
  with pytest.raises(TypeError, match="cannot store a value of type object"):
    write_json_atomic(str(path), {"a": 3, "bad": object()})
  assert json.loads(path.read_text()) == {"a": 2}   # the failed write left the old file whole
  assert os.listdir(tmp_path) == ["eval.json"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    write_json_atomic(str(tmp_path / "missing" / "eval.json"), {})


def _random_dual(tmp_path):
  """(config, benchmark, towers, params) of the tiny dual preset's network, randomly initialised."""
  import jax
  from conftest import recipe_config
  from jaxdistill.data.benchmark import prepare_benchmark
  from jaxdistill.models.build import build_model, init_params, towers
  config = recipe_config("dual")
  bench = prepare_benchmark(config, str(tmp_path))
  config.model.vocab_size = bench.vocab_size
  model = build_model(config.model)
  return config, bench, towers(model), init_params(model, config.model, jax.random.PRNGKey(0))


def test_evaluate_and_report_on_towers(tmp_path):
  """evaluate_and_report(towers, params, ...) on the tiny benchmark with a random dual network:
  the dual row is recall_at_k of the towers' own embeddings; a network without match_scores has
  no rerank row; with match_scores = the dual cosine (carried in the tokens) re-ranking the top-k
  changes nothing, so the rerank row (and its binding) equals the dual row."""
  from jaxdistill.data.pipeline import eval_arrays
  from jaxdistill.evaluate.run import evaluate_and_report
  from jaxdistill.models.build import Towers
  config, bench, dual, params = _random_dual(tmp_path)
  arrays = eval_arrays(bench.splits["test"], *bench.tokens["test"])
  img = np.asarray(dual.embed_image(params, arrays["image"])[0])
  txt = np.asarray(dual.embed_text(params, arrays["text_ids"], arrays["text_mask"])[0])
  want = recall_at_k(similarity_matrix(img, txt), arrays["caption_to_image"])

  results = evaluate_and_report(dual, params, bench.eval_split("test"), config, verbose=False)
  assert results["split"] == "test" and results["dataset"] == "compositional_test"
  assert "dual+rerank@16" not in results and results["skipped"] == {}
  for key, value in want.items():
    assert results["dual"][key] == pytest.approx(value, abs=1e-9), key
  assert 0.0 <= results["dual"]["binding"] <= 100.0

  def with_tokens(embed):   # (emb, tokens) -> (emb, emb as the only token)
    def fn(p, *inputs, rngs=None):
      emb = embed(p, *inputs, rngs=rngs)[0]
      return emb, emb[:, None, :]
    return fn

  cosine_cross = Towers(embed_image=with_tokens(dual.embed_image),
                        embed_text=with_tokens(dual.embed_text), temperature=dual.temperature,
                        match_scores=lambda p, it, tt, mask: jnp.sum(it[:, 0] * tt[:, 0], -1))
  results = evaluate_and_report(cosine_cross, params, bench.eval_split("test"), config,
                                verbose=False)
  rerank = results[f"dual+rerank@{config.eval.rerank_k}"]
  for key in want:
    assert rerank[key] == pytest.approx(results["dual"][key], abs=1e-9), key
  assert rerank["binding"] == pytest.approx(results["dual"]["binding"], abs=1e-9)


def test_evaluate_and_report_with_scann_and_folds(tmp_path):
  """config.eval.ann adds the ScaNN row (equal to exact search on a gallery this small) and its
  gap; an EvalSplit with folds reports their mean; unreadable images leave the protocol."""
  import dataclasses
  from jaxdistill.evaluate.run import evaluate_and_report
  config, bench, dual, params = _random_dual(tmp_path)
  split = bench.eval_split("test")
  config.eval.ann = True
  results = evaluate_and_report(dual, params, split, config, verbose=False)
  for key, value in results["dual"].items():
    if key in results["dual (scann)"]:
      assert results["dual (scann)"][key] == pytest.approx(value, abs=1e-9), key
  assert set(results["scann"]["gap"].values()) == {0.0}
  config.eval.ann = False

  class Unreadable:   # rows 0 and 5 cannot be read: zeros, listed in `failures`
    def __init__(self, images):
      self.images, self.shape, self.failures = images, images.shape, {}
    def __getitem__(self, index):
      rows = np.arange(len(self.images))[index]
      for r in np.atleast_1d(rows):
        if r in (0, 5):
          self.failures[int(r)] = "corrupt"
      return self.images[index]
  halves = [np.arange(0, 32), np.arange(32, 64)]
  lazy = dataclasses.replace(split, images=Unreadable(split.images), folds={"half": halves})
  got = evaluate_and_report(dual, params, lazy, config, verbose=False)
  assert got["num_images"] == 62 and got["num_captions"] == 62 * 5
  assert got["skipped"] == {"corrupt": 2}
  keep = np.setdiff1d(np.arange(64), [0, 5])
  img = np.asarray(dual.embed_image(params, split.images[keep])[0])
  rows = np.flatnonzero(np.isin(split.caption_to_image, keep))
  txt = np.asarray(dual.embed_text(params, split.text_ids[rows], split.text_mask[rows])[0])
  owner = np.searchsorted(keep, split.caption_to_image[rows])
  want = recall_at_k(similarity_matrix(img, txt), owner)
  for key, value in want.items():
    assert got["dual"][key] == pytest.approx(value, abs=1e-6), key
  per_half = []
  for half in halves:
    kept = np.flatnonzero(np.isin(keep, half))
    caps = np.flatnonzero(np.isin(owner, kept))
    per_half.append(recall_at_k(similarity_matrix(img[kept], txt[caps]),
                                np.searchsorted(kept, owner[caps])))
  for key in want:
    assert got["dual_half"][key] == pytest.approx(np.mean([h[key] for h in per_half]), abs=1e-6)
