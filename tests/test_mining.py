"""Mining: exact top-k vs numpy, ScaNN recall, index save / load, the bank, resumable embedding,
the pipeline's hard-negative fields and --mode=mine-style ANN evaluation."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.data.negatives import Bank, MISSING, caption_ids, write_bank
from jaxdistill.evaluate.ann import ann_recall, ranks_from_lists
from jaxdistill.mining.embed import embed_corpus
from jaxdistill.mining.exact import drop_positives, exact_top_k
from jaxdistill.mining.scann_index import build_index, derive_params, load_index, save_index
from jaxdistill.parallel.mesh import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clustered(n, d, clusters, seed, noise=0.35):
  """Unit vectors around `clusters` random centres (the test corpus for ANN recall)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, d))
  x = centres[rng.integers(clusters, size=n)] + noise * rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_top_k(q, x, k, q_owner=None, x_owner=None):
  """Reference: full score matrix, excluded entries dropped, sort by (-score, index)."""
  s = q.astype(np.float64) @ x.astype(np.float64).T
  ids, scores = np.full((len(q), k), -1), np.full((len(q), k), -np.inf)
  for r in range(len(q)):
    keep = np.arange(len(x)) if q_owner is None else np.flatnonzero(x_owner != q_owner[r])
    order = keep[np.lexsort((keep, -s[r, keep]))][:k]
    ids[r, :len(order)], scores[r, :len(order)] = order, s[r, order]
  return scores, ids


# --- exact top-k ------------------------------------------------------------------------------

def test_exact_matches_numpy_across_chunks_and_sharded():
  q, x = clustered(50, 16, 5, 0), clustered(300, 16, 5, 1)
  ref_s, ref_i = numpy_top_k(q, x, 7)
  s, i = exact_top_k(q, x, 7, corpus_block=64, query_block=16)          # 5 chunks, 4 blocks
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_allclose(s, ref_s, rtol=1e-5)
  s8, i8 = exact_top_k(q, x, 7, corpus_block=64, query_block=16, mesh=make_mesh())
  np.testing.assert_array_equal(i8, ref_i)
  assert jax.device_count() == 8


def test_exact_ties_prefer_smaller_index():
  # Hand-worked: corpus rows 0..5 score 1, 2, 2, 1, 2, 0 against the query [1, 0].
  x = np.array([[1, 0], [2, 0], [2, 0], [1, 0], [2, 0], [0, 0]], np.float32)
  q = np.array([[1, 0]], np.float32)
  s, i = exact_top_k(q, x, 4, corpus_block=2)   # ties split across chunk boundaries
  np.testing.assert_array_equal(i, [[1, 2, 4, 0]])
  np.testing.assert_array_equal(s, [[2, 2, 2, 1]])


def test_exact_k_larger_than_corpus_pads():
  x = clustered(5, 8, 2, 2)
  q = clustered(3, 8, 2, 3)
  s, i = exact_top_k(q, x, 9)
  ref_s, ref_i = numpy_top_k(q, x, 9)
  np.testing.assert_array_equal(i, ref_i)
  assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()
  np.testing.assert_allclose(s[:, :5], ref_s[:, :5], rtol=1e-5)


def test_exact_excludes_positives_by_owner():
  q, x = clustered(20, 8, 3, 4), clustered(60, 8, 3, 5)
  x_owner = np.arange(60) // 5          # 12 "images" x 5 "captions"
  q_owner = np.arange(20) % 12
  ref_s, ref_i = numpy_top_k(q, x, 6, q_owner, x_owner)
  s, i = exact_top_k(q, x, 6, query_owner=q_owner, corpus_owner=x_owner, corpus_block=16)
  np.testing.assert_array_equal(i, ref_i)
  assert not np.any(x_owner[i] == q_owner[:, None])
  # Only 55 candidates remain per query: k = 58 leaves 3 padded entries.
  _, i_big = exact_top_k(q, x, 58, query_owner=q_owner, corpus_owner=x_owner)
  assert ((i_big == -1).sum(axis=1) == 3).all()


def test_drop_positives_keeps_order_and_pads():
  ids = np.array([[3, 0, 7, 1, -1]])
  scores = np.array([[5, 4, 3, 2, -np.inf]], np.float32)
  owner = np.array([1, 0, 2, 0, 0, 0, 0, 2])
  s, i = drop_positives(ids, scores, np.array([0]), owner, 3)
  np.testing.assert_array_equal(i, [[0, 7, -1]])     # rows 3 and 1 belong to owner 0
  np.testing.assert_array_equal(s, [[4, 3, -np.inf]])


def test_exact_rejects_bad_input():
  with pytest.raises(ValueError, match="same D"):
    exact_top_k(np.zeros((2, 3)), np.zeros((4, 5)), 1)
  with pytest.raises(ValueError, match="both query_owner"):
    exact_top_k(np.zeros((2, 3)), np.zeros((4, 3)), 1, query_owner=np.zeros(2))


# --- ScaNN --------------------------------------------------------------------------------------

def test_derive_params_rule():
  p = derive_params(1_000_000, 10)
  assert (p.num_leaves, p.num_leaves_to_search, p.training_sample_size, p.reorder) == \
      (1000, 50, 100_000, 100)
  small = derive_params(100, 40)     # below 20k points: no tree
  assert (small.num_leaves, small.num_leaves_to_search, small.training_sample_size,
          small.reorder) == (1, 1, 100, 250)
  assert derive_params(40_000, 21).num_leaves_to_search == 10   # ceil(0.05 * 200)
  assert derive_params(10_000, 10, overrides={"reorder": 150, "num_leaves": 0}).reorder == 150
  with pytest.raises(ValueError, match="unknown index parameter"):
    derive_params(100, 10, overrides={"leaves": 3})


@pytest.fixture(scope="module")
def corpus_and_index(tmp_path_factory):
  x = clustered(20_000, 32, 100, 6)
  q = clustered(300, 32, 100, 7)
  index = build_index(x, derive_params(len(x), 10), 10)
  return x, q, index


def test_scann_recall_at_10_vs_exact(corpus_and_index):
  x, q, index = corpus_and_index
  _, exact = exact_top_k(q, x, 10)
  scores, ids = index.search(q, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
  assert recall >= 0.95, recall
  # Re-ordered scores are exact dot products of the returned rows.
  np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=1e-4)


def test_scann_save_load_round_trip_and_exclusion(corpus_and_index, tmp_path):
  x, q, index = corpus_and_index
  directory = tmp_path / "index"
  save_index(index, str(directory), {"fingerprint": "a"})
  save_index(index, str(directory), {"fingerprint": "b"})     # replaces the older one
  os.rename(directory, tmp_path / "moved")                    # relative asset paths
  loaded, meta = load_index(str(tmp_path / "moved"))
  assert meta["fingerprint"] == "b" and meta["num_points"] == len(x)
  np.testing.assert_array_equal(loaded.search(q, 10)[1], index.search(q, 10)[1])
  assert [p.name for p in tmp_path.iterdir()] == ["moved"]    # no temporary directory left
  owner = np.arange(len(x)) // 5
  q_owner = index.search(q, 1)[1][:, 0] // 5                  # the query's nearest row's owner
  _, ids = loaded.search_excluding(q, 10, q_owner, owner, max_positives=5)
  assert (ids >= 0).all() and not np.any(owner[ids] == q_owner[:, None])


def test_load_index_missing_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="no saved index"):
    load_index(str(tmp_path))


# --- bank -------------------------------------------------------------------------------------

def test_bank_round_trip(tmp_path):
  keys = np.array([30, 10, 20])
  ids = np.array([[1, 2, 3], [4, 5, -1], [7, 8, 9]])
  scores = np.arange(9, dtype=np.float32).reshape(3, 3)
  path = str(tmp_path / "i2t.npy")
  write_bank(path, keys, ids, scores)
  bank = Bank(path)
  assert isinstance(bank.ids, np.memmap) and bank.k == 3 and len(bank) == 3
  got_ids, got_scores = bank.lookup(np.array([[20, 30], [99, 10]]), 2)
  np.testing.assert_array_equal(got_ids, [[[7, 8], [1, 2]], [[MISSING, MISSING], [4, 5]]])
  np.testing.assert_array_equal(got_scores[0], [[6, 7], [0, 1]])
  assert np.isneginf(got_scores[1, 0]).all()
  with pytest.raises(ValueError, match="holds 3 per example"):
    bank.lookup(keys, 4)
  assert os.listdir(tmp_path) == ["i2t.npy"]


def test_bank_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="--mode=mine"):
    Bank(str(tmp_path / "none.npy"))
  np.save(tmp_path / "plain.npy", np.zeros(3))
  with pytest.raises(ValueError, match="not a hard-negative bank"):
    Bank(str(tmp_path / "plain.npy"))
  with pytest.raises(ValueError, match="not unique"):
    write_bank(str(tmp_path / "b.npy"), [1, 1], np.zeros((2, 2)), np.zeros((2, 2)))
  assert caption_ids(np.array([3]), np.array([4]), 5).tolist() == [19]


# --- resumable embedding ------------------------------------------------------------------------

def _embed(batch):   # a deterministic "tower": [b, 3] -> [b, 4]
  x = batch["x"]
  return jnp.concatenate([x, x.sum(axis=1, keepdims=True)], axis=1)


class _Killed(Exception):
  """Stands in for the process dying mid-run."""


def _tower(calls, fail_at=None):
  """_embed that records each batch's first value and raises _Killed on call number fail_at."""
  def fn(batch):
    calls.append(float(batch["x"][0, 0]))
    if len(calls) == fail_at:
      raise _Killed
    return _embed(batch)
  return fn


def test_embed_corpus_sharded_matches_direct(tmp_path):
  x = np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32)
  out = embed_corpus(jax.jit(_embed), {"x": x}, str(tmp_path / "e.npy"), dim=4, batch_size=5,
                     mesh=make_mesh())       # batch rounded up to 8 devices, last batch padded
  np.testing.assert_allclose(out, _embed({"x": x}), rtol=1e-6)
  assert sorted(os.listdir(tmp_path)) == ["e.npy"]


def test_embed_corpus_resumes_after_interruption(tmp_path):
  x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
  path = str(tmp_path / "e.npy")
  calls = []
  with pytest.raises(_Killed):
    embed_corpus(_tower(calls, fail_at=6), {"x": x}, path, dim=4, batch_size=4, chunk_batches=2,
                 fingerprint="t")
  assert not os.path.exists(path)                             # nothing half-written under the name
  with open(path + ".progress.json") as f:
    assert json.load(f)["rows"] == 16                         # two chunks of 2 x 4 rows were saved
  calls.clear()
  out = embed_corpus(_tower(calls), {"x": x}, path, dim=4, batch_size=4, fingerprint="t")
  assert calls[0] == x[16, 0] and len(calls) == 6             # resumed at row 16
  np.testing.assert_array_equal(out, _embed({"x": x}))
  assert sorted(os.listdir(tmp_path)) == ["e.npy"]
  # Another fingerprint (another tower) never reuses a partial file.
  os.remove(path)
  with pytest.raises(_Killed):
    embed_corpus(_tower([], fail_at=3), {"x": x}, path, dim=4, batch_size=4, chunk_batches=1,
                 fingerprint="t")
  calls.clear()
  embed_corpus(_tower(calls), {"x": x}, path, dim=4, batch_size=4, fingerprint="other")
  assert calls[0] == 0.0 and len(calls) == 10


def test_killed_embedding_process_resumes(tmp_path):
  """A real SIGKILL during embedding: no final file, and the rerun resumes and completes."""
  path = str(tmp_path / "e.npy")
  script = textwrap.dedent(f"""
      import time, numpy as np
      from jaxdistill.mining.embed import embed_corpus
      def slow(batch):
        time.sleep(0.05)
        x = batch["x"]
        return np.concatenate([x, x.sum(axis=1, keepdims=True)], axis=1)
      x = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
      embed_corpus(slow, {{"x": x}}, {path!r}, dim=4, batch_size=4, chunk_batches=1,
                   fingerprint="k", log_every_s=1e9)
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, "-c", script], env=env)
  progress = path + ".progress.json"
  deadline = time.time() + 120
  while time.time() < deadline:
    if os.path.exists(progress) and json.load(open(progress))["rows"] >= 8:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(path)
  done = json.load(open(progress))["rows"]
  assert 8 <= done < 400
  calls = []
  x = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
  out = embed_corpus(_tower(calls), {"x": x}, path, dim=4, batch_size=4, fingerprint="k")
  assert calls[0] == x[done, 0]
  np.testing.assert_array_equal(out, _embed({"x": x}))


# --- ANN evaluation -------------------------------------------------------------------------------

def test_ranks_from_lists():
  ids = np.array([[4, 2, 9], [1, -1, -1]])
  gold_of = np.arange(10) // 2
  np.testing.assert_array_equal(ranks_from_lists(ids, gold_of, np.array([1, 3])), [1, 3])


def test_ann_recall_close_to_exact_and_exact_matches_dense():
  from jaxdistill.evaluate.retrieval import recall_at_k
  img = clustered(2000, 32, 40, 8, noise=0.3)
  rng = np.random.default_rng(9)
  txt = np.repeat(img, 5, axis=0) + 0.15 * rng.normal(size=(10_000, 32)).astype(np.float32)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  c2i = np.repeat(np.arange(2000), 5)
  result = ann_recall(img, txt, c2i)
  dense = recall_at_k(img @ txt.T, c2i)
  for key in ("i2t_r1", "i2t_r10", "t2i_r1", "t2i_r10"):
    assert result["exact"][key] == pytest.approx(dense[key], abs=0.1)
    assert abs(result["gap"][key]) <= 2.0, (key, result["gap"])
  assert min(result["neighbor_recall@10"].values()) >= 0.9


def test_failed_saves_keep_the_previous_index_and_bank(corpus_and_index, tmp_path, monkeypatch):
  x, q, index = corpus_and_index
  save_index(index, str(tmp_path / "index"), {"fingerprint": "old"})
  write_bank(str(tmp_path / "i2t.npy"), [1, 2], [[3], [4]], [[0.5], [0.25]])

  class Broken:
    def serialize(self, directory, relative_path):   # writes a piece, then dies
      open(os.path.join(directory, "scann_config.pb"), "w").write("partial")
      raise _Killed

  broken = type(index)(Broken(), index.params, index.num_points, index.dim)
  with pytest.raises(_Killed):
    save_index(broken, str(tmp_path / "index"), {"fingerprint": "new"})
  monkeypatch.setattr(np, "save", lambda f, a: (f.write(b"\x93NUMPY partial"), _raise()))
  with pytest.raises(_Killed):
    write_bank(str(tmp_path / "i2t.npy"), [1, 2], [[5], [6]], [[0.0], [0.0]])
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["i2t.npy", "index"]    # no temporaries left
  assert load_index(str(tmp_path / "index"))[1]["fingerprint"] == "old"
  assert Bank(str(tmp_path / "i2t.npy")).lookup(np.array([2]), 1)[0].tolist() == [[4]]


def _raise():
  raise _Killed
