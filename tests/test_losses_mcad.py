"""MCAD losses (paper 001 eq. 1-17) against numpy transcribed literally from the paper, plus
hand-worked cases (KL direction, ties in the top-k, k = n, a sigma row with one non-zero entry)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.losses import mcad
from jaxdistill.losses.contrastive import similarity_logits

N, K, E = 6, 3, 5
MATCH = 1   # ALBEF's match class


# --------------------------------------------------------------------- numpy, from the paper

def np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_f_d(image, text, tau):
  """Eq. 1: softmax over the last dimension of (I T^T) / tau."""
  return np_softmax(image @ text.T / tau)


def np_f_d_both(image, text, tau):
  """(D_i2t, D_t2i) = (F_D(I, T, tau), F_D(T, I, tau)) (eq. 3: t2i swaps the inputs)."""
  return np_f_d(image, text, tau), np_f_d(text, image, tau)


def np_pair_f_d(image_lm, text_lm, tau):
  """Eq. 1 / 3 with the features of each pair: image_lm, text_lm [n, n, e] hold I and T of the
  pair (image l, text m). Returns (D_i2t, D_t2i): row l of D_i2t over texts m, row m of D_t2i
  over images l (eq. 3: t2i swaps the inputs)."""
  n = image_lm.shape[0]
  s = np.array([[image_lm[l, m] @ text_lm[l, m] for m in range(n)] for l in range(n)]) / tau
  return np_softmax(s), np_softmax(s.T)


def np_f_kl(d, d_hat):
  """Eq. 2 as we read it: rows l of KL(D_hat_l || D_l), 0 log 0 = 0; mean over l."""
  total = 0.0
  for l in range(d.shape[0]):
    total += sum(d_hat[l, c] * math.log(d_hat[l, c] / d[l, c])
                 for c in range(d.shape[1]) if d_hat[l, c] > 0)
  return total / d.shape[0]


def np_top_k(d, k):
  """Eq. 5, ties to the lower index."""
  return np.array([sorted(range(d.shape[1]), key=lambda c: (-d[l, c], c))[:k]
                   for l in range(d.shape[0])])


def np_f_ss(itm):
  """f_SS(i_l, t_m) = softmax(ITM logits of (image l, text m))[match]; itm [n, n, 2]."""
  return lambda l, m: np_softmax(itm[l, m])[MATCH]


def np_d_ss(p_i2t, p_t2i, f_ss, n):
  """Eq. 6: only the entries of P are computed (the rest NaN)."""
  d_i2t, d_t2i = np.full((n, n), np.nan), np.full((n, n), np.nan)
  for l in range(n):
    for m in p_i2t[l]:
      d_i2t[l, m] = f_ss(l, m)
    for m in p_t2i[l]:
      d_t2i[l, m] = f_ss(m, l)
  return d_i2t, d_t2i


def np_gather(d, p):
  """D[P] in R^{n x k}."""
  return np.array([[d[l, m] for m in p[l]] for l in range(d.shape[0])])


def np_sigma(d):
  """Eq. 11."""
  return np.array([[d[l, m] / sum(d[l, v] for v in range(d.shape[1])) for m in range(d.shape[1])]
                   for l in range(d.shape[0])])


def np_f_ds(d_i2t, d_t2i, t):
  """Eq. 15."""
  return np_f_kl(d_i2t, t["ds_i2t"]) + np_f_kl(d_t2i, t["ds_t2i"])


def np_f_ss_terms(d_i2t, d_t2i, t):
  """The sigma terms of eq. 10 (alone: eq. 16)."""
  return (np_f_kl(np_sigma(np_gather(d_i2t, t["p_i2t"])),
                  np_sigma(np_gather(t["ss_i2t"], t["p_i2t"])))
          + np_f_kl(np_sigma(np_gather(d_t2i, t["p_t2i"])),
                    np_sigma(np_gather(t["ss_t2i"], t["p_t2i"]))))


def np_f_mt(d_i2t, d_t2i, t):
  """Eq. 10."""
  return np_f_ds(d_i2t, d_t2i, t) + np_f_ss_terms(d_i2t, d_t2i, t)


def np_targets(ds_image, ds_text, ds_tau, itm, k):
  """Eq. 4-6."""
  n = ds_image.shape[0]
  t = {"ds_i2t": np_f_d(ds_image, ds_text, ds_tau), "ds_t2i": np_f_d(ds_text, ds_image, ds_tau)}
  t["p_i2t"], t["p_t2i"] = np_top_k(t["ds_i2t"], k), np_top_k(t["ds_t2i"], k)
  t["ss_i2t"], t["ss_t2i"] = np_d_ss(t["p_i2t"], t["p_t2i"], np_f_ss(itm), n)
  return t


def np_gated(p_i2t, p_t2i, n):
  """Eq. 12's condition for the pair (image l, text m)."""
  return np.array([[m in p_i2t[l] or l in p_t2i[m] for m in range(n)] for l in range(n)])


# ------------------------------------------------------------------------------ jax helpers

def unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def f32(x):
  return jnp.asarray(x, jnp.float32)


def random_batch(seed, n=N):
  rng = np.random.default_rng(seed)
  return {"s_image": unit(rng, n, E), "s_text": unit(rng, n, E), "s_tau": 0.2,
          "ds_image": unit(rng, n, E), "ds_text": unit(rng, n, E), "ds_tau": 0.1,
          "itm": rng.normal(size=(n, n, 2)) * 2,
          # the integrated teacher's features: closed gate ([n, e]) and per pair ([n, n, e])
          "t_image": unit(rng, n, E), "t_text": unit(rng, n, E),
          "t_image_lm": unit(rng, n, n, E), "t_text_lm": unit(rng, n, n, E), "t_tau": 0.15}


def jax_targets(b, k):
  targets = mcad.dual_stream_targets(f32(b["ds_image"]), f32(b["ds_text"]), b["ds_tau"], k)
  itm = f32(b["itm"])
  ss_i2t, ss_t2i = mcad.score_top_k_pairs(lambda im, tx: itm[im, tx], targets.top_i2t,
                                          targets.top_t2i, match_index=MATCH)
  return targets._replace(ss_i2t=ss_i2t, ss_t2i=ss_t2i)


def jax_integrated(b, top_i2t, top_t2i):
  """The 7-tuple of features `integrated_logits` reads, gathered from the dense per-pair ones."""
  image_lm, text_lm = f32(b["t_image_lm"]), f32(b["t_text_lm"])
  rows = jnp.arange(top_i2t.shape[0])[:, None]
  return (f32(b["t_image"]), f32(b["t_text"]),
          image_lm[rows, top_i2t], text_lm[rows, top_i2t],
          image_lm[top_t2i, rows], text_lm[top_t2i, rows], jnp.float32(b["t_tau"]))


def np_integrated_lm(b, t):
  """Per pair (l, m): the fused features where eq. 12 gates, the closed-gate ones elsewhere."""
  gated = np_gated(t["p_i2t"], t["p_t2i"], b["s_image"].shape[0])[..., None]
  image_lm = np.where(gated, b["t_image_lm"], b["t_image"][:, None, :])
  text_lm = np.where(gated, b["t_text_lm"], b["t_text"][None, :, :])
  return image_lm, text_lm


def broadcast_rows(x, n):
  """Features of example l for every pair (l, m) -> [n, n, e]."""
  return np.broadcast_to(x[:, None, :], (n, n, x.shape[1]))


def broadcast_cols(x, n):
  """Features of example m for every pair (l, m) -> [n, n, e]."""
  return np.broadcast_to(x[None, :, :], (n, n, x.shape[1]))


# ----------------------------------------------------------------------------- eq. 1, 2, 14

def test_f_d_matches_numpy():
  b = random_batch(0)
  got = mcad.similarity_distribution(f32(b["s_image"]), f32(b["s_text"]), b["s_tau"])
  np.testing.assert_allclose(got, np_f_d(b["s_image"], b["s_text"], b["s_tau"]), rtol=1e-5)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)


def test_f_kl_takes_the_target_first_hand_worked():
  # D = softmax([log 3, 0]) = [3/4, 1/4], D_hat = [1/2, 1/2]:
  # KL(D_hat || D) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3)   (KL(D || D_hat) would be
  # 3/4 log(3/2) + 1/4 log(1/2) = 0.1308, not 0.1438). Second row: equal, 0. Mean over rows.
  student = jnp.asarray([[math.log(3.0), 0.0], [1.0, 2.0]])
  target = jnp.asarray([[0.0, 0.0], [1.0, 2.0]])
  np.testing.assert_allclose(mcad.f_kl(student, target), 0.5 * math.log(4 / 3) / 2, rtol=1e-6)
  grad = jax.grad(lambda s, t: mcad.f_kl(s, t), argnums=1)(student, target)
  assert np.all(grad == 0)   # no gradient into the target


def test_gt_loss_hand_worked_and_numpy():
  # i2t = log [[3, 1], [1, 3]]: D_ll = 3/4 in every row; KL(I_l || D_l) = -log(3/4).
  i2t = jnp.log(jnp.asarray([[3.0, 1.0], [1.0, 3.0]]))
  loss, parts = mcad.gt_loss(i2t, i2t.T)
  np.testing.assert_allclose(loss, 2 * math.log(4 / 3), rtol=1e-6)
  np.testing.assert_allclose(parts["gt_i2t"], math.log(4 / 3), rtol=1e-6)
  b = random_batch(1)
  d_i2t = np_f_d(b["s_image"], b["s_text"], b["s_tau"])
  d_t2i = np_f_d(b["s_text"], b["s_image"], b["s_tau"])
  expected = np_f_kl(d_i2t, np.eye(N)) + np_f_kl(d_t2i, np.eye(N))          # eq. 14
  got, _ = mcad.gt_loss(*similarity_logits(f32(b["s_image"]), f32(b["s_text"]), b["s_tau"]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


# ----------------------------------------------------------------------------- eq. 5, 6, 11

def test_teacher_top_k_matches_numpy():
  b = random_batch(2)
  targets = jax_targets(b, K)
  t = np_targets(b["ds_image"], b["ds_text"], b["ds_tau"], b["itm"], K)
  np.testing.assert_array_equal(targets.top_i2t, t["p_i2t"])
  np.testing.assert_array_equal(targets.top_t2i, t["p_t2i"])
  assert targets.top_i2t.dtype == jnp.int32


def test_teacher_top_k_ties_take_the_lower_index():
  ds = jnp.asarray([[1.0, 3, 3, 2, 3],
                    [0.0, 0, 0, 0, 0],
                    [5.0, 1, 5, 1, 1],
                    [0.0, 1, 2, 3, 4],
                    [2.0, 2, 1, 2, 0]])
  top_i2t, top_t2i = mcad.teacher_top_k(ds, 2)
  np.testing.assert_array_equal(top_i2t, [[1, 2], [0, 1], [0, 2], [4, 3], [0, 1]])
  np.testing.assert_array_equal(top_i2t, np_top_k(np.asarray(ds), 2))
  np.testing.assert_array_equal(top_t2i, np_top_k(np.asarray(ds).T, 2))
  # k = 3 takes the third of the tied 3s in row 0 and the lowest of the tied 1s in row 2.
  np.testing.assert_array_equal(mcad.teacher_top_k(ds, 3)[0][:3], [[1, 2, 4], [0, 1, 2], [0, 2, 1]])


def test_teacher_top_k_rejects_k_outside_the_batch():
  for k in (0, N + 1):
    with pytest.raises(ValueError, match="k="):
      mcad.teacher_top_k(jnp.zeros((N, N)), k)


def test_single_stream_scores_matches_numpy_and_hand_worked():
  b = random_batch(3)
  targets = jax_targets(b, K)
  t = np_targets(b["ds_image"], b["ds_text"], b["ds_tau"], b["itm"], K)
  np.testing.assert_allclose(targets.ss_i2t, np_gather(t["ss_i2t"], t["p_i2t"]), rtol=1e-5)
  np.testing.assert_allclose(targets.ss_t2i, np_gather(t["ss_t2i"], t["p_t2i"]), rtol=1e-5)
  # Two-class logits [0, log 3]: P(class 1) = 3/4, P(class 0) = 1/4; a one-logit head: sigmoid.
  logits = jnp.asarray([[[0.0, math.log(3.0)]]])
  np.testing.assert_allclose(mcad.single_stream_scores(logits, 1), [[0.75]], rtol=1e-6)
  np.testing.assert_allclose(mcad.single_stream_scores(logits, 0), [[0.25]], rtol=1e-6)
  np.testing.assert_allclose(mcad.single_stream_scores(jnp.asarray([[0.0, math.log(3.0)]])),
                             [[0.5, 0.75]], rtol=1e-6)
  with pytest.raises(ValueError, match="match_index"):
    mcad.score_top_k_pairs(lambda im, tx: jnp.zeros((im.shape[0], 2)), jnp.zeros((2, 1), int),
                           jnp.zeros((2, 1), int))
  with pytest.raises(ValueError, match="two-class"):
    mcad.single_stream_scores(jnp.zeros((2, 3)), 1)
  assert np.all(jax.grad(lambda x: mcad.single_stream_scores(x, 1).sum())(logits) == 0)


def test_top_k_pairs_are_the_pairs_eq_6_scores():
  top_i2t = jnp.asarray([[1, 0], [2, 1], [0, 2]])
  top_t2i = jnp.asarray([[2, 0], [0, 1], [1, 2]])
  images, texts = mcad.top_k_pairs(top_i2t, top_t2i)
  # i2t: (image l, text P[l, j]); t2i: (image P[l, j], text l)
  np.testing.assert_array_equal(images[0], [[0, 0], [1, 1], [2, 2]])
  np.testing.assert_array_equal(texts[0], top_i2t)
  np.testing.assert_array_equal(images[1], top_t2i)
  np.testing.assert_array_equal(texts[1], [[0, 0], [1, 1], [2, 2]])


def test_l1_normalize_hand_worked():
  # Appendix C: [0.8, 0.4, 0.2] -> [4/7, 2/7, 1/7] (softmax would give [0.451, 0.302, 0.247]).
  got = mcad.l1_normalize(jnp.asarray([[0.8, 0.4, 0.2], [0.0, 0.3, 0.0], [0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(got, [[4 / 7, 2 / 7, 1 / 7], [0, 1, 0], [0, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(jax.nn.softmax(jnp.asarray([0.8, 0.4, 0.2])), [0.451, 0.302, 0.247],
                             atol=1e-3)
  np.testing.assert_allclose(got[:2], np_sigma(np.asarray([[0.8, 0.4, 0.2], [0.0, 0.3, 0.0]])),
                             rtol=1e-6)


def test_sigma_term_with_one_non_zero_score_is_the_cross_entropy_of_that_entry():
  # Row of k = 3 single-stream scores [0, 0.3, 0]: sigma = [0, 1, 0], so F_KL(sigma(D[P]), .) =
  # -log softmax(student's 3 gathered logits)[1]; finite value and gradient (no 0 * log 0 NaN).
  logits = jnp.asarray([[0.5, 2.0, -1.0, 3.0]])           # the column 3 is outside the top-3
  top = jnp.asarray([[1, 0, 2]])
  targets = mcad.Targets(jnp.zeros((1, 4)), top, top, jnp.asarray([[0.0, 0.3, 0.0]]),
                         jnp.asarray([[0.0, 0.3, 0.0]]))
  value, grad = jax.value_and_grad(lambda x: mcad.f_ss(x, x, targets)[0])(logits)
  expected = -math.log(math.exp(0.5) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
  np.testing.assert_allclose(value, 2 * expected, rtol=1e-6)
  assert np.all(np.isfinite(grad)) and grad[0, 3] == 0


# ----------------------------------------------------------------------------- eq. 8-10, 15-17

@pytest.mark.parametrize("seed", [4, 5])
def test_every_loss_matches_numpy(seed):
  b = random_batch(seed)
  t = np_targets(b["ds_image"], b["ds_text"], b["ds_tau"], b["itm"], K)
  targets = jax_targets(b, K)
  student = similarity_logits(f32(b["s_image"]), f32(b["s_text"]), b["s_tau"])
  teacher, fai, fat = mcad.integrated_logits(
      f32(b["s_image"]), f32(b["s_text"]), b["s_tau"],
      jax_integrated(b, targets.top_i2t, targets.top_t2i), targets.top_i2t, targets.top_t2i)
  fai_p, fat_p = mcad.cross_alignment_logits(f32(b["s_image"]), f32(b["s_text"]), b["s_tau"],
                                             f32(b["ds_image"]), f32(b["ds_text"]), b["ds_tau"])

  d_s = np_f_d_both(b["s_image"], b["s_text"], b["s_tau"])
  image_lm, text_lm = np_integrated_lm(b, t)
  tau_fa = (b["t_tau"] + b["s_tau"]) / 2
  d_t = np_pair_f_d(image_lm, text_lm, b["t_tau"])                                   # eq. 3
  d_fai = np_pair_f_d(broadcast_rows(b["s_image"], N), text_lm, tau_fa)
  d_fat = np_pair_f_d(image_lm, broadcast_cols(b["s_text"], N), tau_fa)
  tau_fa_p = (b["ds_tau"] + b["s_tau"]) / 2                                          # eq. 17
  d_fai_p = np_f_d_both(b["s_image"], b["ds_text"], tau_fa_p)
  d_fat_p = np_f_d_both(b["ds_image"], b["s_text"], tau_fa_p)

  cases = {
      "f_ds": (mcad.f_ds(*student, targets), np_f_ds(*d_s, t)),
      "f_ss": (mcad.f_ss(*student, targets), np_f_ss_terms(*d_s, t)),
      "f_mt": (mcad.f_mt(*teacher, targets), np_f_mt(*d_t, t)),
      "L_CLIP": (mcad.clip_loss(*student, targets), np_f_ds(*d_s, t)),                   # eq. 15
      "L_ALBEF": (mcad.albef_loss(*student, targets), np_f_ss_terms(*d_s, t)),           # eq. 16
      "L_CLIP_FA": (mcad.clip_fa_loss(fai_p, fat_p, targets),
                    np_f_ds(*d_fai_p, t) + np_f_ds(*d_fat_p, t)),                        # eq. 17
      "L_MT": (mcad.mt_loss(student, teacher, targets), np_f_mt(*d_s, t) + np_f_mt(*d_t, t)),
      "L_MT_FA": (mcad.mt_fa_loss(fai, fat, targets), np_f_mt(*d_fai, t) + np_f_mt(*d_fat, t)),
  }
  for name, ((got, parts), expected) in cases.items():
    np.testing.assert_allclose(got, expected, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(sum(parts.values()), got, rtol=1e-5, err_msg=name)
  _, parts = mcad.mt_loss(student, teacher, targets)
  np.testing.assert_allclose(parts["mt_teacher_ss_t2i"],
                             np_f_kl(np_sigma(np_gather(d_t[1], t["p_t2i"])),
                                     np_sigma(np_gather(t["ss_t2i"], t["p_t2i"]))), rtol=2e-5)


def test_k_equals_n_sigma_term_is_the_whole_row_and_every_pair_is_fused():
  b = random_batch(6)
  targets = jax_targets(b, N)
  t = np_targets(b["ds_image"], b["ds_text"], b["ds_tau"], b["itm"], N)
  assert np.all(np_gated(t["p_i2t"], t["p_t2i"], N))
  student = similarity_logits(f32(b["s_image"]), f32(b["s_text"]), b["s_tau"])
  # k = n: sigma(D[P]) is D itself (permuted), so f_SS is F_KL(D, sigma(D^SS)) over whole rows.
  d_s = np_f_d(b["s_image"], b["s_text"], b["s_tau"])
  f = np_f_ss(b["itm"])
  ss_i2t = np.array([[f(l, m) for m in range(N)] for l in range(N)])
  ss_t2i = np.array([[f(m, l) for m in range(N)] for l in range(N)])
  expected = (np_f_kl(d_s, ss_i2t / ss_i2t.sum(1, keepdims=True))
              + np_f_kl(np_f_d(b["s_text"], b["s_image"], b["s_tau"]),
                        ss_t2i / ss_t2i.sum(1, keepdims=True)))
  np.testing.assert_allclose(mcad.f_ss(*student, targets)[0], expected, rtol=1e-5)
  # Every entry of D^T uses the pair's fused features: the closed-gate features do not matter.
  integrated = jax_integrated(b, targets.top_i2t, targets.top_t2i)
  zeroed = (jnp.zeros((N, E)), jnp.zeros((N, E))) + integrated[2:]
  args = (f32(b["s_image"]), f32(b["s_text"]), b["s_tau"])
  for got, want in zip(mcad.integrated_logits(*args, integrated, targets.top_i2t, targets.top_t2i),
                       mcad.integrated_logits(*args, zeroed, targets.top_i2t, targets.top_t2i)):
    np.testing.assert_array_equal(got[0], want[0])
  image_lm, text_lm = np_integrated_lm(b, t)
  got_t = mcad.integrated_logits(*args, integrated, targets.top_i2t, targets.top_t2i)[0]
  np.testing.assert_allclose(jax.nn.softmax(got_t[0]),
                             np_pair_f_d(image_lm, text_lm, b["t_tau"])[0], rtol=1e-5)


def test_pair_logits_outside_the_gates_are_the_closed_gate_logits_exactly():
  b = random_batch(7)
  targets = jax_targets(b, 2)
  top_i2t, top_t2i = targets.top_i2t, targets.top_t2i
  gated = np_gated(np.asarray(top_i2t), np.asarray(top_t2i), N)
  assert gated.sum() < N * N
  integrated = jax_integrated(b, top_i2t, top_t2i)
  image, text, pairs, tau = integrated[0], integrated[1], integrated[2:6], integrated[6]

  def logits(pairs):
    return mcad.pair_logits(image, text, tau, top_i2t, top_t2i, *pairs)

  i2t, t2i = logits(pairs)
  np.testing.assert_array_equal(t2i, i2t.T)
  closed = image @ text.T / tau
  np.testing.assert_array_equal(np.asarray(i2t)[~gated], np.asarray(closed)[~gated])
  assert not np.allclose(np.asarray(i2t)[gated], np.asarray(closed)[gated])
  # No gradient from any entry outside the gates into the pair features: the gate is exactly 0.
  outside = jnp.asarray(~gated, jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(logits(p)[0] * outside))(pairs)
  assert all(np.all(g == 0) for g in grads)
  grads = jax.grad(lambda p: jnp.sum(logits(p)[0] * (1 - outside)))(pairs)
  assert all(np.any(g != 0) for g in grads)


def test_pair_in_both_top_k_lists_uses_its_i2t_copy_once():
  # n = 2, k = 1: image 0's top text is 1 and text 1's top image is 0, so pair (0, 1) is in both.
  top_i2t, top_t2i = jnp.asarray([[1], [0]]), jnp.asarray([[1], [0]])
  image, text = jnp.zeros((2, 2)), jnp.zeros((2, 2))
  one = jnp.asarray([[[1.0, 0.0]], [[1.0, 0.0]]])
  pairs = (one, one * 2, one * 3, one * 5)          # (0, 1) via i2t: 1 * 2; via t2i: 3 * 5

  def logits(pairs):
    return mcad.pair_logits(image, text, 1.0, top_i2t, top_t2i, *pairs)[0]

  # i2t pairs (0, 1), (1, 0); t2i pairs (image 1, text 0), (image 0, text 1) = the same two.
  np.testing.assert_array_equal(logits(pairs), [[0, 2], [2, 0]])
  grads = jax.grad(lambda p: logits(p).sum())(pairs)
  assert np.all(grads[2] == 0) and np.all(grads[3] == 0)   # the t2i copies count nowhere
  np.testing.assert_array_equal(grads[0], one * 2)


def test_gradients_reach_the_student_and_never_a_teacher():
  b = random_batch(8)

  def total(student_image, student_text, student_tau, ds_image, ds_text, ds_tau, itm, pairs):
    targets = mcad.dual_stream_targets(ds_image, ds_text, ds_tau, K)
    ss = mcad.score_top_k_pairs(lambda im, tx: itm[im, tx], targets.top_i2t, targets.top_t2i, MATCH)
    targets = targets._replace(ss_i2t=ss[0], ss_t2i=ss[1])
    student = similarity_logits(student_image, student_text, student_tau)
    teacher, fai, fat = mcad.integrated_logits(student_image, student_text, student_tau, pairs,
                                               targets.top_i2t, targets.top_t2i)
    fa_p = mcad.cross_alignment_logits(student_image, student_text, student_tau,
                                       ds_image, ds_text, ds_tau)
    return (mcad.gt_loss(*student)[0] + mcad.clip_loss(*student, targets)[0]
            + mcad.albef_loss(*student, targets)[0] + mcad.clip_fa_loss(*fa_p, targets)[0]
            + mcad.mt_loss(student, teacher, targets)[0] + mcad.mt_fa_loss(fai, fat, targets)[0])

  targets = jax_targets(b, K)
  args = (f32(b["s_image"]), f32(b["s_text"]), jnp.float32(b["s_tau"]), f32(b["ds_image"]),
          f32(b["ds_text"]), jnp.float32(b["ds_tau"]), f32(b["itm"]),
          jax_integrated(b, targets.top_i2t, targets.top_t2i))
  grads = jax.grad(total, argnums=tuple(range(8)))(*args)
  for g in grads[:3]:                                   # student features and temperature
    assert np.all(np.isfinite(g)) and np.any(g != 0)
  for g in grads[3:7]:                                  # the teachers' inputs: exactly zero
    assert np.all(g == 0)
  for g in grads[7]:                                    # the integrated features (module outputs)
    assert np.any(g != 0)


def test_single_stream_terms_need_the_top_k_targets():
  targets = mcad.dual_stream_targets(jnp.eye(3), jnp.eye(3), 0.1)
  assert targets.top_i2t is None
  with pytest.raises(ValueError, match="top_i2t"):
    mcad.f_mt(jnp.zeros((3, 3)), jnp.zeros((3, 3)), targets)
