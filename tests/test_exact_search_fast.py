"""mining/exact.py `exact_top_k`, both backends, against a brute-force numpy top-k: block sizes that
divide nothing, exact ties (across chunks and across the numpy backend's strided groups), owner
masks (fetched past and masked in the block), NaN scores, k larger than the corpus, and memory."""

import tracemalloc

import numpy as np
import pytest

from jaxdistill.mining import exact
from jaxdistill.mining.exact import PAD_ID, exact_top_k
from jaxdistill.parallel.mesh import make_mesh

BACKENDS = ("numpy", "jax")


def brute_top_k(q, x, k, q_owner=None, x_owner=None):
  """Reference: the whole score matrix in float64, excluded and NaN entries dropped, each row
  sorted by (-score, index); -inf entries and the tail padded with (PAD_ID, -inf)."""
  s = q.astype(np.float64) @ x.astype(np.float64).T
  ids, scores = np.full((len(q), k), PAD_ID), np.full((len(q), k), -np.inf)
  for r in range(len(q)):
    keep = np.arange(len(x)) if q_owner is None else np.flatnonzero(x_owner != q_owner[r])
    keep = keep[~np.isnan(s[r, keep]) & ~np.isneginf(s[r, keep])]
    order = keep[np.lexsort((keep, -s[r, keep]))][:k]
    ids[r, :len(order)], scores[r, :len(order)] = order, s[r, order]
  return scores, ids


def integer_data(seed, num_q, n, d, values=3):
  """Small-integer embeddings: every dot product is exact in float32 and ties are common."""
  rng = np.random.default_rng(seed)
  return (rng.integers(-values // 2 + 1, values // 2 + 1, (num_q, d)).astype(np.float32),
          rng.integers(-values // 2 + 1, values // 2 + 1, (n, d)).astype(np.float32))


@pytest.mark.parametrize("backend,query_block,corpus_block", [
    ("numpy", 7, 97), ("numpy", 64, 700), ("numpy", 1000, 5000), ("jax", 16, 700)])
def test_matches_brute_force_on_gaussian_data(backend, query_block, corpus_block):
  rng = np.random.default_rng(0)
  q, x = rng.normal(size=(45, 24)).astype(np.float32), rng.normal(size=(2501, 24)).astype(np.float32)
  ref_s, ref_i = brute_top_k(q, x, 10)
  s, i = exact_top_k(q, x, 10, query_block=query_block, corpus_block=corpus_block, backend=backend)
  assert s.dtype == np.float32 and i.dtype == np.int32 and i.shape == (45, 10)
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,corpus_block", [
    ("numpy", 3), ("numpy", 50), ("numpy", 333), ("numpy", 4096), ("jax", 333)])
def test_exact_ties_take_the_smaller_index(backend, corpus_block):
  # 3 values per dimension over 4 dimensions: ~81 distinct rows among 2,000, so each query's
  # top 12 is full of equal scores spread over chunks and (numpy) over strided groups.
  q, x = integer_data(1, 30, 2000, 4)
  ref_s, ref_i = brute_top_k(q, x, 12)
  s, i = exact_top_k(q, x, 12, query_block=8, corpus_block=corpus_block, backend=backend)
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_array_equal(s, ref_s.astype(np.float32))
  tied = (ref_s[:, :-1] == ref_s[:, 1:]).sum()
  assert tied > 100   # the case really is about ties


def test_group_bound_path_with_ties_and_small_groups(monkeypatch):
  """The numpy backend's group bound with groups of 4 columns (each chunk has many groups):
  identical lists on data with massive ties, including a constant scorer."""
  monkeypatch.setattr(exact, "GROUP", 4)
  q, x = integer_data(2, 20, 1500, 3)
  for corpus in (x, np.ones_like(x)):   # the second: every score ties
    ref_s, ref_i = brute_top_k(q, corpus, 9)
    s, i = exact_top_k(q, corpus, 9, query_block=6, corpus_block=400, backend="numpy")
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_owner_masks_fetched_past_and_masked_in_block(backend):
  q, x = integer_data(3, 40, 900, 5)
  # Owners 0..149 with 5 rows each (fetched past: 5 <= FETCH_PAST_MAX), then owner 150 with 150
  # rows (more than FETCH_PAST_MAX: masked inside each score block).
  x_owner = np.concatenate([np.repeat(np.arange(150), 5), np.full(150, 150)]) * 1000 + 7
  x_owner = x_owner.astype(np.int64)
  assert (x_owner == x_owner[-1]).sum() > exact.FETCH_PAST_MAX
  for q_owner in (x_owner[np.arange(40) * 17 % 750],                 # small owners only
                  np.concatenate([[x_owner[-1]] * 5, x_owner[:35]])):  # and the big owner
    ref_s, ref_i = brute_top_k(q, x, 8, q_owner, x_owner)
    s, i = exact_top_k(q, x, 8, query_owner=q_owner, corpus_owner=x_owner, query_block=16,
                       corpus_block=128, backend=backend)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))
    assert not np.any(x_owner[i] == q_owner[:, None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_corpus_and_all_but_few_excluded(backend):
  rng = np.random.default_rng(4)
  q, x = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
  s, i = exact_top_k(q, x, 9, backend=backend)
  ref_s, ref_i = brute_top_k(q, x, 9)
  np.testing.assert_array_equal(i, ref_i)
  assert (i[:, 5:] == PAD_ID).all() and np.isneginf(s[:, 5:]).all()
  # Owner 0 has 3 of the 5 rows: its queries keep 2 candidates, so k = 4 pads 2; the others 0.
  x_owner, q_owner = np.array([0, 0, 0, 1, 2]), np.array([0, 0, 1, 2, 0, 1])
  s, i = exact_top_k(q, x, 4, query_owner=q_owner, corpus_owner=x_owner, backend=backend)
  ref_s, ref_i = brute_top_k(q, x, 4, q_owner, x_owner)
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_array_equal((i == PAD_ID).sum(axis=1), np.where(q_owner == 0, 2, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_rank_last_and_pad(backend):
  rng = np.random.default_rng(5)
  q, x = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(300, 8)).astype(np.float32)
  x[[3, 150, 299]] = np.nan          # these rows score NaN against every query
  q[2] = np.nan                      # this query scores NaN against every row
  s, i = exact_top_k(q, x, 10, corpus_block=64, backend=backend)
  ref_s, ref_i = brute_top_k(q, x, 10)
  np.testing.assert_array_equal(i, ref_i)
  assert not np.isin(i, [3, 150, 299]).any()
  assert (i[2] == PAD_ID).all() and np.isneginf(s[2]).all()


def test_backends_agree_sharded_over_eight_devices():
  rng = np.random.default_rng(6)
  q, x = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(700, 16)).astype(np.float32)
  s_np, i_np = exact_top_k(q, x, 7, backend="numpy")
  s_jx, i_jx = exact_top_k(q, x, 7, query_block=16, corpus_block=64, mesh=make_mesh(), backend="jax")
  s_auto, i_auto = exact_top_k(q, x, 7)            # CPU: the numpy backend
  np.testing.assert_array_equal(i_np, i_jx)
  np.testing.assert_array_equal(i_np, i_auto)
  np.testing.assert_allclose(s_np, s_jx, rtol=1e-5)


def test_numpy_backend_memory_is_one_block_not_the_matrix():
  """Host allocations (tracemalloc) while searching 128 queries x 40,000 rows in 64 x 2,048
  blocks stay far below the 20 MB score matrix."""
  rng = np.random.default_rng(7)
  q, x = rng.normal(size=(128, 8)).astype(np.float32), rng.normal(size=(40_000, 8)).astype(np.float32)
  exact_top_k(q[:2], x[:100], 10, backend="numpy")    # imports and first-call set-up
  tracemalloc.start()
  try:
    exact_top_k(q, x, 10, query_block=64, corpus_block=2048, backend="numpy")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  matrix = 128 * 40_000 * 4
  assert peak < matrix / 8, (peak, matrix)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="backend"):
    exact_top_k(np.zeros((2, 3)), np.zeros((4, 3)), 1, backend="torch")
  with pytest.raises(ValueError, match="query_block"):
    exact_top_k(np.zeros((2, 3)), np.zeros((4, 3)), 1, corpus_block=0)
  with pytest.raises(ValueError, match="k >= 1"):
    exact_top_k(np.zeros((2, 3)), np.zeros((4, 3)), 0)
