"""Leaner-and-Faster losses (paper 000 eq. 1-3, §3.2.2, Table 2) against numpy transcribed from
the paper with loops, hand-worked cases, gradients (finite differences; exactly zero for the
teacher) and 8 sharded devices against 1."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conftest import check_finite_differences
from jaxdistill.losses import leaner_faster as lf
from jaxdistill.losses.contrastive import contrastive_loss, similarity_logits
from jaxdistill.parallel.mesh import BATCH_AXES, make_mesh

N, D, K = 6, 5, 3


# --------------------------------------------------------------------- numpy, from the paper

def np_ce(scores, positive):
  """-log exp(scores[positive]) / sum_c exp(scores[c]) for one query (a list of logits)."""
  m = max(scores)
  return math.log(sum(math.exp(x - m) for x in scores)) + m - scores[positive]


def np_intra(student, teacher, tau):
  """Eq. 2 / 3: -1/N sum_i log exp(s_i.t_i / tau) / sum_j exp(s_i.t_j / tau)."""
  n = len(student)
  return sum(np_ce([student[i] @ teacher[j] / tau for j in range(n)], i) for i in range(n)) / n


def np_infonce(image, text, tau):
  """Eq. 1 (L_t2v: text i against images j) + its symmetric version L_v2t: (v2t, t2v)."""
  n = len(image)
  t2v = sum(np_ce([text[i] @ image[j] / tau for j in range(n)], i) for i in range(n)) / n
  v2t = sum(np_ce([image[i] @ text[j] / tau for j in range(n)], i) for i in range(n)) / n
  return v2t, t2v


def np_mse(student, teacher, normalize):
  if normalize:
    student = student / np.linalg.norm(student, axis=1, keepdims=True)
    teacher = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
  n, d = student.shape
  return sum((student[i, c] - teacher[i, c]) ** 2 for i in range(n) for c in range(d)) / (n * d)


def np_softmax_list(scores):
  m = max(scores)
  e = [math.exp(x - m) for x in scores]
  return [x / sum(e) for x in e]


def np_kl(s_img, s_txt, t_img, t_txt, tau, t_tau, kd_t):
  """KL(q || p) per query row of each direction, p / q the student's / teacher's softmax over the
  batch of <query, candidate> / tau / T; mean over rows; (i2t, t2i)."""
  n = len(s_img)
  out = []
  for s_q, s_c, t_q, t_c in ((s_img, s_txt, t_img, t_txt), (s_txt, s_img, t_txt, t_img)):
    total = 0.0
    for i in range(n):
      p = np_softmax_list([s_q[i] @ s_c[j] / tau / kd_t for j in range(n)])
      q = np_softmax_list([t_q[i] @ t_c[j] / t_tau / kd_t for j in range(n)])
      total += sum(q[j] * math.log(q[j] / p[j]) for j in range(n))
    out.append(total / n)
  return tuple(out)


def np_hn(queries, candidates, mined, tau, valid=None, in_batch=True):
  """Query i's logits: in-batch (all N, or its positive alone) then its valid mined candidates
  (mined [N, k, D]: its own; [M, D]: the shared pool); CE on the positive; mean over i."""
  n = len(queries)
  total = 0.0
  for i in range(n):
    if in_batch:
      scores, positive = [queries[i] @ candidates[j] / tau for j in range(n)], i
    else:
      scores, positive = [queries[i] @ candidates[i] / tau], 0
    pool = mined[i] if mined.ndim == 3 else mined
    for l in range(len(pool)):
      if valid is None or valid[i][l]:
        scores.append(queries[i] @ pool[l] / tau)
    total += np_ce(scores, positive)
  return total / n


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _f32(*arrays):
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# --------------------------------------------------------------------- stage 1: eq. 2 / 3

def test_intra_modal_matches_numpy():
  rng = np.random.default_rng(0)
  s, t = _unit(rng, N, D), _unit(rng, N, D)
  loss, parts = lf.intra_modal_contrastive_loss(*_f32(s, t), 0.2)
  np.testing.assert_allclose(loss, np_intra(s, t, 0.2), rtol=1e-5)
  np.testing.assert_allclose(parts["intra_s2t"], loss)
  sym, parts = lf.intra_modal_contrastive_loss(*_f32(s, t), 0.2, symmetric=True)
  # The teacher-query direction is eq. 2 with the roles swapped.
  np.testing.assert_allclose(parts["intra_t2s"], np_intra(t, s, 0.2), rtol=1e-5)
  np.testing.assert_allclose(sym, (np_intra(s, t, 0.2) + np_intra(t, s, 0.2)) / 2, rtol=1e-5)


def test_intra_modal_identical_orthonormal_items():
  # s = t = the first N unit vectors: the positive logit 1/tau, the N-1 others 0, every row alike.
  n, tau = 4, 0.5
  e = np.eye(n, 6)
  loss, _ = lf.intra_modal_contrastive_loss(*_f32(e, e), tau)
  np.testing.assert_allclose(loss, math.log(1 + (n - 1) * math.exp(-1 / tau)), rtol=1e-6)


def test_intra_modal_hand_worked_two_items():
  # tau = 1; s1 = (1, 0), s2 = (0, 1), t1 = (1, 0), t2 = (-1, 0).
  # Student queries: row 1 logits [1, -1] -> log(1 + e^-2); row 2 [0, 0] -> log 2.
  # Teacher queries: t1 against (s1, s2) = [1, 0] -> log(1 + e^-1); t2 = [-1, 0] with positive
  # s2 (logit 0) -> log(1 + e^-1).
  s = np.array([[1.0, 0.0], [0.0, 1.0]])
  t = np.array([[1.0, 0.0], [-1.0, 0.0]])
  one_way = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
  loss, _ = lf.intra_modal_contrastive_loss(*_f32(s, t), 1.0)
  np.testing.assert_allclose(loss, one_way, rtol=1e-6)
  sym, parts = lf.intra_modal_contrastive_loss(*_f32(s, t), 1.0, symmetric=True)
  np.testing.assert_allclose(parts["intra_t2s"], math.log(1 + math.exp(-1)), rtol=1e-6)
  np.testing.assert_allclose(sym, (one_way + math.log(1 + math.exp(-1))) / 2, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_intra_modal_gradients(symmetric):
  rng = np.random.default_rng(1)
  s, t = _unit(rng, 4, 3), _unit(rng, 4, 3)
  tau = 0.3
  fn = lambda s, t, tau: lf.intra_modal_contrastive_loss(s, t, tau, symmetric)[0]
  with jax.enable_x64(True):
    g_s, g_t, g_tau = jax.grad(fn, argnums=(0, 1, 2))(jnp.asarray(s), jnp.asarray(t),
                                                      jnp.asarray(tau))
    np.testing.assert_array_equal(g_t, 0.0)
    check_finite_differences(lambda s, tau: fn(s, t, tau), (s, np.asarray(tau)), (g_s, g_tau))
  if not symmetric:
    # dL/ds_i = (sum_j p_ij t_j - t_i) / (N tau), p_i = softmax_j(s_i.t_j / tau).
    logits = s @ t.T / tau
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(g_s, (p @ t - t) / (4 * tau), rtol=1e-9)


# --------------------------------------------------------------------- Table 2 ablations

@pytest.mark.parametrize("normalize", [True, False])
def test_mse_matches_numpy(normalize):
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(N, D)) * 3, rng.normal(size=(N, D))
  loss, parts = lf.mse_distillation_loss(*_f32(s, t), normalize)
  np.testing.assert_allclose(loss, np_mse(s, t, normalize), rtol=1e-5)
  np.testing.assert_allclose(parts["mse_sq_dist"], np_mse(s, t, normalize) * D, rtol=1e-5)


def test_mse_hand_worked():
  # s = (3, 4) -> (0.6, 0.8); t = (1, 0). Normalised: ((-0.4)^2 + 0.8^2) / 2 = 0.4 = (2 - 2 cos) / D.
  # Raw: ((3 - 1)^2 + 4^2) / 2 = 10.
  s, t = np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])
  np.testing.assert_allclose(lf.mse_distillation_loss(*_f32(s, t))[0], 0.4, rtol=1e-6)
  np.testing.assert_allclose(lf.mse_distillation_loss(*_f32(s, t), normalize=False)[0], 10.0,
                             rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_mse_gradients(normalize):
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  fn = lambda s, t: lf.mse_distillation_loss(s, t, normalize)[0]
  with jax.enable_x64(True):
    g_s, g_t = jax.grad(fn, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_array_equal(g_t, 0.0)
    check_finite_differences(lambda s: fn(s, t), (s,), (g_s,))
  if not normalize:
    np.testing.assert_allclose(g_s, 2 * (s - t) / s.size, rtol=1e-9)


def test_infonce_matches_numpy_and_is_twice_contrastive_loss():
  rng = np.random.default_rng(4)
  img, txt = _unit(rng, N, D), _unit(rng, N, D)
  loss, parts = lf.infonce_loss(*_f32(img, txt), 0.1)
  v2t, t2v = np_infonce(img, txt, 0.1)
  np.testing.assert_allclose(parts["infonce_v2t"], v2t, rtol=1e-5)
  np.testing.assert_allclose(parts["infonce_t2v"], t2v, rtol=1e-5)
  np.testing.assert_allclose(loss, v2t + t2v, rtol=1e-5)
  mean, _ = contrastive_loss(*similarity_logits(*_f32(img, txt), 0.1), jnp.arange(N))
  np.testing.assert_allclose(loss, 2 * mean, rtol=1e-6)


def test_infonce_gradients():
  rng = np.random.default_rng(5)
  img, txt = _unit(rng, 3, 2), _unit(rng, 3, 2)
  fn = lambda i, t, tau: lf.infonce_loss(i, t, tau)[0]
  with jax.enable_x64(True):
    grads = jax.grad(fn, argnums=(0, 1, 2))(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(0.7))
    check_finite_differences(fn, (img, txt, np.asarray(0.7)), grads)


# --------------------------------------------------------------------- stage 2: KD (KL)

@pytest.mark.parametrize("t_tau,kd_t", [(None, 1.0), (0.05, 1.0), (0.05, 2.0)])
def test_matching_kl_matches_numpy(t_tau, kd_t):
  rng = np.random.default_rng(6)
  si, st, ti, tt = (_unit(rng, N, D) for _ in range(4))
  loss, parts = lf.matching_kl_loss(*_f32(si, st, ti, tt), 0.2, t_tau, kd_t)
  i2t, t2i = np_kl(si, st, ti, tt, 0.2, 0.2 if t_tau is None else t_tau, kd_t)
  np.testing.assert_allclose(parts["kd_kl_i2t"], i2t, rtol=1e-5)
  np.testing.assert_allclose(parts["kd_kl_t2i"], t2i, rtol=1e-5)
  np.testing.assert_allclose(loss, i2t + t2i, rtol=1e-5)


def test_matching_kl_hand_worked():
  # tau = 1 / log 3: the student's orthonormal pairs give row logits [log 3, 0] -> p = [3/4, 1/4]
  # (and [1/4, 3/4] in row 2); a teacher with one embedding for everything gives q = [1/2, 1/2].
  # KL(q || p) = (1/2) log((1/2) / (3/4)) + (1/2) log((1/2) / (1/4)) = (1/2) log(4/3) per row and
  # per direction; i2t + t2i = log(4/3). The reverse KL(p || q) would be (3/4) log(3/2) + (1/4)
  # log(1/2) = 0.1308 instead of 0.1438.
  e = np.eye(2)
  same = np.array([[1.0, 0.0], [1.0, 0.0]])
  loss, parts = lf.matching_kl_loss(*_f32(e, e, same, same), 1 / math.log(3))
  np.testing.assert_allclose(parts["kd_kl_i2t"], 0.5 * math.log(4 / 3), rtol=1e-6)
  np.testing.assert_allclose(loss, math.log(4 / 3), rtol=1e-6)
  # The same distributions: zero.
  zero, _ = lf.matching_kl_loss(*_f32(e, e, e, e), 0.3)
  np.testing.assert_allclose(zero, 0.0, atol=1e-7)


def test_matching_kl_gradients_reach_the_student_only():
  rng = np.random.default_rng(7)
  si, st, ti, tt = (_unit(rng, 3, 2) for _ in range(4))
  fn = lambda si, st, ti, tt, tau, t_tau: lf.matching_kl_loss(si, st, ti, tt, tau, t_tau, 1.5)[0]
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a) for a in (si, st, ti, tt, 0.4, 0.25))
    grads = jax.grad(fn, argnums=tuple(range(6)))(*args)
    for g in (grads[2], grads[3], grads[5]):
      np.testing.assert_array_equal(g, 0.0)
    assert np.abs(grads[0]).max() > 1e-3 and np.abs(grads[1]).max() > 1e-3
    check_finite_differences(lambda si, st, tau: fn(si, st, ti, tt, tau, 0.25),
                              (si, st, np.asarray(0.4)), (grads[0], grads[1], grads[4]))


# --------------------------------------------------------------------- stage 2: HN

@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("in_batch", [True, False])
def test_hard_negative_matches_numpy(shared, in_batch):
  rng = np.random.default_rng(8)
  q, c = _unit(rng, N, D), _unit(rng, N, D)
  mined = _unit(rng, N * K, D) if shared else _unit(rng, N, K, D)
  valid = rng.random((N, N * K if shared else K)) > 0.3
  loss, parts = lf.hard_negative_loss(*_f32(q, c, mined), 0.1, jnp.asarray(valid), in_batch)
  np.testing.assert_allclose(loss, np_hn(q, c, mined, 0.1, valid, in_batch), rtol=1e-5)
  np.testing.assert_allclose(parts["hn_valid"], valid.mean(), rtol=1e-6)
  everything, parts = lf.hard_negative_loss(*_f32(q, c, mined), 0.1, None, in_batch)
  np.testing.assert_allclose(everything, np_hn(q, c, mined, 0.1, None, in_batch), rtol=1e-5)
  np.testing.assert_allclose(parts["hn_valid"], 1.0)


def test_hard_negative_hand_worked_two_queries():
  # tau = 1, k = 1. q = c = (e1, e2). Query 1's mined m1 = e1 (logit 1, as its positive):
  # logits [1, 0, 1] -> log((2e + 1) / e) = log(2 + 1/e). Query 2's m2 = -e1 (logit 0):
  # [0, 1, 0] -> log(1 + 2/e). Masking m1 leaves query 1 with [1, 0] -> log(1 + 1/e).
  e = np.eye(2)
  mined = np.array([[[1.0, 0.0]], [[-1.0, 0.0]]])
  row1, row2 = math.log(2 + 1 / math.e), math.log(1 + 2 / math.e)
  loss, _ = lf.hard_negative_loss(*_f32(e, e, mined), 1.0)
  np.testing.assert_allclose(loss, (row1 + row2) / 2, rtol=1e-6)
  masked, parts = lf.hard_negative_loss(*_f32(e, e, mined), 1.0, jnp.array([[False], [True]]))
  np.testing.assert_allclose(masked, (math.log(1 + 1 / math.e) + row2) / 2, rtol=1e-6)
  np.testing.assert_allclose(parts["hn_valid"], 0.5)
  # Positive + mined only: query 1 [1, 1] -> log 2, query 2 [1, 0] -> log(1 + 1/e).
  alone, _ = lf.hard_negative_loss(*_f32(e, e, mined), 1.0, in_batch_negatives=False)
  np.testing.assert_allclose(alone, (math.log(2) + math.log(1 + 1 / math.e)) / 2, rtol=1e-6)


def test_hard_negative_without_mined_is_in_batch_infonce():
  rng = np.random.default_rng(9)
  img, txt, mined = _f32(_unit(rng, N, D), _unit(rng, N, D), _unit(rng, N, K, D))
  loss, _ = lf.hard_negative_loss(img, txt, mined, 0.2, jnp.zeros((N, K), bool))
  _, parts = contrastive_loss(*similarity_logits(img, txt, 0.2), jnp.arange(N))
  np.testing.assert_allclose(loss, parts["itc_i2t"], rtol=1e-6)


def test_shared_pool_is_the_dual_recipes_reading():
  # methods/dual.py: image rows against [B in-batch texts ++ all B*k mined texts], a mined text
  # owned by the row's own image or MISSING (-1) masked to -inf; CE on column i.
  rng = np.random.default_rng(10)
  img, txt, neg = _unit(rng, N, D), _unit(rng, N, D), _unit(rng, N, K, D)
  owner = rng.integers(-1, N, (N, K))
  tau = 0.15
  logits = np.concatenate([img @ txt.T, img @ neg.reshape(N * K, D).T], 1) / tau
  drop = (owner.reshape(-1)[None, :] == np.arange(N)[:, None]) | (owner.reshape(-1)[None] == -1)
  logits[:, N:][drop] = -np.inf
  expected = np.mean([np_ce([x for x in logits[i] if x > -np.inf], i) for i in range(N)])
  valid = jnp.asarray(~drop)
  loss, _ = lf.hard_negative_loss(*_f32(img, txt, neg.reshape(N * K, D)), tau, valid)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_hard_negative_gradients(shared):
  rng = np.random.default_rng(11)
  q, c = _unit(rng, 3, 2), _unit(rng, 3, 2)
  mined = _unit(rng, 4, 2) if shared else _unit(rng, 3, 2, 2)
  valid = jnp.asarray(np.array([[True, False, True, True], [True, True, False, True],
                                [False, True, True, True]]) if shared
                      else np.array([[True, False], [True, True], [False, True]]))
  fn = lambda q, c, m, tau: lf.hard_negative_loss(q, c, m, tau, valid)[0]
  with jax.enable_x64(True):
    args = (q, c, mined, np.asarray(0.5))
    grads = jax.grad(fn, argnums=(0, 1, 2, 3))(*(jnp.asarray(a) for a in args))
    assert np.all(np.isfinite(grads[2]))
    check_finite_differences(fn, args, grads)
  # A left-out mined candidate gets no gradient.
  g_mined = np.asarray(grads[2])
  if not shared:
    np.testing.assert_array_equal(g_mined[~np.asarray(valid)], 0.0)


def test_bad_mined_shape_is_rejected():
  with pytest.raises(ValueError, match="mined"):
    lf.hard_negative_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 1, 1, 3)), 1.0)


# --------------------------------------------------------------------- stage 2: the objective

def _stage2_inputs(seed, n=N, d=D, k=K):
  rng = np.random.default_rng(seed)
  return dict(si=_unit(rng, n, d), st=_unit(rng, n, d), ti=_unit(rng, n, d), tt=_unit(rng, n, d),
              mt=_unit(rng, n, k, d), mi=_unit(rng, n * k, d),
              mtv=rng.random((n, k)) > 0.3, miv=rng.random((n, n * k)) > 0.3)


def np_stage2(x, tau, tower, w, t_tau=None, kd_t=1.0):
  """infonce + KL + eq. 2/3 (by tower) + HN (image queries against their own mined texts, text
  queries against the shared pool of mined images), each times its weight."""
  infonce = sum(np_infonce(x["si"], x["st"], tau))
  kl = sum(np_kl(x["si"], x["st"], x["ti"], x["tt"], tau, tau if t_tau is None else t_tau, kd_t))
  intra = 0.0
  if tower in ("image", "both"):
    intra += np_intra(x["si"], x["ti"], tau)
  if tower in ("text", "both"):
    intra += np_intra(x["st"], x["tt"], tau)
  hn = (np_hn(x["si"], x["st"], x["mt"], tau, x["mtv"])
        + np_hn(x["st"], x["si"], x["mi"], tau, x["miv"]))
  return w[0] * infonce + w[1] * kl + w[2] * intra + w[3] * hn


def _stage2(x, tau, tower="image", weights=(1.0, 1.0, 1.0, 1.0), **kwargs):
  si, st, ti, tt, mt, mi = _f32(x["si"], x["st"], x["ti"], x["tt"], x["mt"], x["mi"])
  return lf.stage2_loss(si, st, ti, tt, tau, tower=tower, mined_text=mt,
                        mined_text_valid=jnp.asarray(x["mtv"]), mined_image=mi,
                        mined_image_valid=jnp.asarray(x["miv"]), infonce_weight=weights[0],
                        kl_weight=weights[1], contrastive_weight=weights[2],
                        hn_weight=weights[3], **kwargs)


@pytest.mark.parametrize("tower", ["image", "text", "both"])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (0.5, 2.0, 0.3, 1.5)])
def test_stage2_matches_numpy(tower, weights):
  x = _stage2_inputs(12)
  loss, parts = _stage2(x, 0.1, tower, weights, teacher_temperature=0.05)
  np.testing.assert_allclose(loss, np_stage2(x, 0.1, tower, weights, t_tau=0.05), rtol=1e-5)
  expected_parts = {"infonce", "infonce_v2t", "infonce_t2v", "kd_kl", "kd_kl_i2t", "kd_kl_t2i",
                    "kd_contrastive", "hn", "hn_v2t", "hn_t2v", "hn_valid_v2t", "hn_valid_t2v"}
  expected_parts |= {f"kd_contrastive_{m}" for m in ("image", "text") if tower in (m, "both")}
  assert set(parts) == expected_parts
  np.testing.assert_allclose(parts["kd_contrastive"],
                             np_stage2(x, 0.1, tower, (0, 0, 1, 0)), rtol=1e-5)
  np.testing.assert_allclose(parts["hn"], np_stage2(x, 0.1, tower, (0, 0, 0, 1)), rtol=1e-5)


def test_stage2_ablations_are_zero_weights():
  x = _stage2_inputs(13)
  full, parts = _stage2(x, 0.1)
  no_kd, _ = _stage2(x, 0.1, weights=(1.0, 0.0, 0.0, 1.0))
  no_hn, _ = _stage2(x, 0.1, weights=(1.0, 1.0, 1.0, 0.0))
  neither, _ = _stage2(x, 0.1, weights=(1.0, 0.0, 0.0, 0.0))
  np.testing.assert_allclose(no_kd, parts["infonce"] + parts["hn"], rtol=1e-6)
  np.testing.assert_allclose(no_hn, full - parts["hn"], rtol=1e-6)
  np.testing.assert_allclose(neither, parts["infonce"], rtol=1e-6)
  # No mined negatives: no HN term (whatever its weight) and no hn parts.
  si, st, ti, tt = _f32(x["si"], x["st"], x["ti"], x["tt"])
  plain, plain_parts = lf.stage2_loss(si, st, ti, tt, 0.1, hn_weight=5.0)
  np.testing.assert_allclose(plain, no_hn, rtol=1e-6)
  assert not any(name.startswith("hn") for name in plain_parts)


def test_stage2_hand_worked_identical_orthonormal():
  # Student = teacher = the first 3 unit vectors in both modalities, tau: every in-batch row has
  # logits [1/tau on its positive, 0 x 2] -> a = log(1 + 2 e^{-1/tau}); KL = 0; L_t2v + L_v2t = 2a;
  # eq. 2 (image tower) = a; each image's one mined text is e_4 (orthogonal to all: logit 0) ->
  # L_HN = log(1 + 3 e^{-1/tau}). L = 3a + L_HN.
  tau = 0.4
  e = jnp.eye(3, 4)
  mined = jnp.broadcast_to(jnp.eye(4)[3], (3, 1, 4))
  a = math.log(1 + 2 * math.exp(-1 / tau))
  hn = math.log(1 + 3 * math.exp(-1 / tau))
  loss, parts = lf.stage2_loss(e, e, e, e, tau, mined_text=mined)
  np.testing.assert_allclose(parts["kd_kl"], 0.0, atol=1e-7)
  np.testing.assert_allclose(parts["infonce"], 2 * a, rtol=1e-6)
  np.testing.assert_allclose(parts["kd_contrastive_image"], a, rtol=1e-6)
  np.testing.assert_allclose(parts["hn"], hn, rtol=1e-6)
  np.testing.assert_allclose(loss, 3 * a + hn, rtol=1e-6)


@pytest.mark.parametrize("tower", ["image", "both"])
def test_stage2_gradients(tower):
  x = _stage2_inputs(14, n=3, d=2, k=2)
  tau, t_tau = 0.5, 0.3

  def fn(si, st, ti, tt, mt, mi, tau, t_tau):
    return lf.stage2_loss(si, st, ti, tt, tau, tower=tower, mined_text=mt,
                          mined_text_valid=jnp.asarray(x["mtv"]), mined_image=mi,
                          mined_image_valid=jnp.asarray(x["miv"]), teacher_temperature=t_tau,
                          kd_temperature=1.3, kl_weight=0.7, hn_weight=1.2)[0]

  with jax.enable_x64(True):
    args = (x["si"], x["st"], x["ti"], x["tt"], x["mt"], x["mi"], np.asarray(tau),
            np.asarray(t_tau))
    grads = jax.grad(fn, argnums=tuple(range(8)))(*(jnp.asarray(a) for a in args))
    for teacher_grad in (grads[2], grads[3], grads[7]):   # teacher image, text, temperature
      np.testing.assert_array_equal(teacher_grad, 0.0)
    for student_grad in (grads[0], grads[1], grads[4], grads[5]):
      assert np.abs(student_grad).max() > 1e-4
    student = (0, 1, 4, 5, 6)
    check_finite_differences(
        lambda si, st, mt, mi, tau: fn(si, st, x["ti"], x["tt"], mt, mi, tau, t_tau),
        tuple(args[i] for i in student), tuple(grads[i] for i in student))


def test_stage2_jit_equals_eager():
  x = _stage2_inputs(15)
  eager, eager_parts = _stage2(x, 0.1, "both", (0.5, 2.0, 0.3, 1.5))
  jitted = jax.jit(lambda tau: _stage2(x, tau, "both", (0.5, 2.0, 0.3, 1.5)))
  loss, parts = jitted(jnp.asarray(0.1))
  np.testing.assert_allclose(loss, eager, rtol=1e-6)
  for name in eager_parts:
    np.testing.assert_allclose(parts[name], eager_parts[name], rtol=1e-6, err_msg=name)


def test_stage2_rejects_unknown_tower():
  e = jnp.eye(2)
  with pytest.raises(ValueError, match="tower"):
    lf.stage2_loss(e, e, e, e, 1.0, tower="images")


# --------------------------------------------------------------------- 8 devices vs 1

B = 16   # global batch, 2 rows per simulated device


def _sharded_value_and_grad(fn, batch_args, scalar_args, mesh):
  """jit(value_and_grad(fn)) with the batch arguments' leading axis sharded over the mesh's batch
  axes (NamedSharding), the scalars replicated; gradients w.r.t. every argument."""
  rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  rep = NamedSharding(mesh, PartitionSpec())
  batch_args = [jax.device_put(jnp.asarray(a, jnp.float32), rows) for a in batch_args]
  scalar_args = [jax.device_put(jnp.asarray(a, jnp.float32), rep) for a in scalar_args]
  for a in batch_args:
    assert len(a.sharding.device_set) == mesh.size
    assert a.addressable_shards[0].data.shape[0] == a.shape[0] // mesh.size
  n = len(batch_args) + len(scalar_args)
  out = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n)), has_aux=True))(
      *batch_args, *scalar_args)
  return jax.device_get(out)


def _assert_agree(many, one):
  (loss_m, parts_m), grads_m = many
  (loss_1, parts_1), grads_1 = one
  np.testing.assert_allclose(loss_m, loss_1, rtol=1e-5, atol=1e-5)
  assert set(parts_m) == set(parts_1)
  for name in parts_1:
    np.testing.assert_allclose(parts_m[name], parts_1[name], rtol=1e-5, atol=1e-5, err_msg=name)
  for g_m, g_1 in zip(grads_m, grads_1):
    np.testing.assert_allclose(g_m, g_1, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(g_1).max()))


def _cases():
  rng = np.random.default_rng(16)
  u = lambda *shape: _unit(rng, *shape)
  si, st, ti, tt = u(B, D), u(B, D), u(B, D), u(B, D)
  mt, mi = u(B, K, D), u(B * K, D)
  mtv = rng.random((B, K)) > 0.3
  miv = rng.random((B, B * K)) > 0.3

  def stage2(si, st, ti, tt, mt, mi, tau, t_tau):
    return lf.stage2_loss(si, st, ti, tt, tau, tower="both", mined_text=mt,
                          mined_text_valid=jnp.asarray(mtv), mined_image=mi,
                          mined_image_valid=jnp.asarray(miv), teacher_temperature=t_tau,
                          kd_temperature=1.5, kl_weight=0.7, hn_weight=1.2)

  return {
      "intra": (lambda s, t, tau: lf.intra_modal_contrastive_loss(s, t, tau), (si, ti), (0.07,)),
      "intra_symmetric": (lambda s, t, tau: lf.intra_modal_contrastive_loss(s, t, tau, True),
                          (si, ti), (0.07,)),
      "mse": (lambda s, t: lf.mse_distillation_loss(s * 3, t), (si, ti), ()),
      "infonce": (lf.infonce_loss, (si, st), (0.05,)),
      "kl": (lambda a, b, c, d, tau, t_tau: lf.matching_kl_loss(a, b, c, d, tau, t_tau),
             (si, st, ti, tt), (0.05, 0.02)),
      "hn": (lambda q, c, m, tau: lf.hard_negative_loss(q, c, m, tau, jnp.asarray(mtv)),
             (si, st, mt), (0.05,)),
      "hn_shared": (lambda q, c, m, tau: lf.hard_negative_loss(q, c, m, tau, jnp.asarray(miv)),
                    (st, si, mi), (0.05,)),
      "stage2": (stage2, (si, st, ti, tt, mt, mi), (0.05, 0.02)),
  }


@pytest.mark.parametrize("name", list(_cases()))
def test_eight_devices_equal_one(name):
  fn, batch_args, scalar_args = _cases()[name]
  mesh = make_mesh()
  assert mesh.size == 8
  many = _sharded_value_and_grad(fn, batch_args, scalar_args, mesh)
  one = _sharded_value_and_grad(fn, batch_args, scalar_args, make_mesh(devices=jax.devices()[:1]))
  _assert_agree(many, one)
  if name == "stage2":   # the teacher still gets no gradient when sharded
    for g in (many[1][2], many[1][3], many[1][7]):
      np.testing.assert_array_equal(g, 0.0)
