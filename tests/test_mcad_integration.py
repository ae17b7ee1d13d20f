"""MCAD's integration module (paper 001 eq. 12-13) against a numpy transcription built pair by
pair, its gates, the full MCAD objective's gradients, and 8 simulated devices against 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.losses import mcad
from jaxdistill.losses.contrastive import similarity_logits
from jaxdistill.models.mcad_integration import IntegrationModule
from jaxdistill.parallel.mesh import batch_sharding, make_mesh, replicated
from tests.test_losses_mcad import (MATCH, broadcast_cols, broadcast_rows, f32, np_f_d_both,
                                    np_f_mt, np_gated, np_pair_f_d, np_targets, unit)

E, DI, DT, DH = 4, 5, 5, 3        # embed width; dual image / text embedding and [CLS] widths
MODULE = IntegrationModule(embed_dim=E, mlp_dim=7, mlp_depth=2, alpha_init=0.7,
                           temperature_init=0.2)


def batch(seed, n):
  rng = np.random.default_rng(seed)
  return {"s_image": unit(rng, n, E), "s_text": unit(rng, n, E), "s_tau": np.float32(0.15),
          "ds_image": unit(rng, n, DI), "ds_text": unit(rng, n, DT), "ds_tau": np.float32(0.1),
          "hidden": rng.normal(size=(n, n, DH)),       # H^SS of every pair (image l, text m)
          "itm": rng.normal(size=(n, n, 2)) * 2}


def init(b, k, module=MODULE):
  n = b["ds_image"].shape[0]
  top = jnp.zeros((n, k), jnp.int32)
  hidden = jnp.zeros((n, k, DH))
  return jax.jit(module.init)(jax.random.key(0), f32(b["ds_image"]), f32(b["ds_text"]), hidden,
                             hidden, top, top)["params"]


@jax.jit
def _apply(params, b, top_i2t, top_t2i):
  images, texts = mcad.top_k_pairs(top_i2t, top_t2i)
  hidden = b["hidden"][images, texts]                                       # [2, n, k, DH]
  gates = MODULE.apply({"params": params}, hidden[0], hidden[1], top_i2t, top_t2i,
                       method=IntegrationModule.gates)
  return gates, MODULE.apply({"params": params}, b["ds_image"], b["ds_text"], hidden[0],
                             hidden[1], top_i2t, top_t2i)


def apply(params, b, top_i2t, top_t2i, method=None):
  """The module on the top-k pairs of batch b: its gates (eq. 12, dense) or its features."""
  arrays = {name: f32(b[name]) for name in ("hidden", "ds_image", "ds_text")}
  gates, fused = _apply(params, arrays, top_i2t, top_t2i)
  return gates if method == "gates" else fused


# ------------------------------------------------------------------------ numpy, eq. 12-13

def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_mlp(p, x):
  depth = len(p)
  for i in range(depth):
    x = x @ np.asarray(p[f"layer_{i}"]["kernel"], np.float64) + np.asarray(p[f"layer_{i}"]["bias"])
    if i < depth - 1:
      x = np_gelu(x)
  return x


def np_norm(v):
  return v / np.linalg.norm(v)


def np_module(params, b, p_i2t, p_t2i):
  """Eq. 12-13 for every pair (image l, text m): (g1, g2, I^T, T^T), each [n, n, e]."""
  n = b["ds_image"].shape[0]
  alpha = float(params["alpha"])
  g1, g2 = np.zeros((n, n, E)), np.zeros((n, n, E))
  image_t, text_t = np.zeros((n, n, E)), np.zeros((n, n, E))
  for l in range(n):
    for m in range(n):
      if m in p_i2t[l] or l in p_t2i[m]:                                    # eq. 12
        g1[l, m] = np_mlp(params["g1"], b["hidden"][l, m])
        g2[l, m] = np_mlp(params["g2"], b["hidden"][l, m])
      text_t[l, m] = np_norm(np_mlp(params["g3"], b["ds_text"][m]) + alpha * g1[l, m])    # eq. 13
      image_t[l, m] = np_norm(np_mlp(params["g4"], b["ds_image"][l]) + alpha * g2[l, m])
  return g1, g2, image_t, text_t


def np_objective(params, b, k):
  """Eq. 8 + 9 (L_MT + L_MT_FA) and its distributions, literally."""
  n = b["ds_image"].shape[0]
  t = np_targets(b["ds_image"], b["ds_text"], b["ds_tau"], b["itm"], k)
  _, _, image_t, text_t = np_module(params, b, t["p_i2t"], t["p_t2i"])
  tau_t = float(np.clip(np.exp(params["log_temperature"]), 0.001, 0.5))
  tau_fa = (tau_t + b["s_tau"]) / 2
  d_s = np_f_d_both(b["s_image"], b["s_text"], b["s_tau"])
  d_t = np_pair_f_d(image_t, text_t, tau_t)
  d_fai = np_pair_f_d(broadcast_rows(b["s_image"], n), text_t, tau_fa)
  d_fat = np_pair_f_d(image_t, broadcast_cols(b["s_text"], n), tau_fa)
  return {"L_MT": np_f_mt(*d_s, t) + np_f_mt(*d_t, t),
          "L_MT_FA": np_f_mt(*d_fai, t) + np_f_mt(*d_fat, t), "d_t": d_t, "t": t}


# ------------------------------------------------------------------------ the jax objective

def objective(params, student_image, student_text, student_tau, teacher, k):
  """Every MCAD loss of one batch from raw inputs, as a recipe would call them: the teachers'
  inputs are `teacher` (dual features + tau, H^SS and ITM logits of every pair, from which the
  top-k pairs are gathered as a single-stream apply function would compute them)."""
  targets = mcad.dual_stream_targets(teacher["ds_image"], teacher["ds_text"], teacher["ds_tau"], k)
  top_i2t, top_t2i = targets.top_i2t, targets.top_t2i
  ss_i2t, ss_t2i = mcad.score_top_k_pairs(lambda im, tx: teacher["itm"][im, tx], top_i2t, top_t2i,
                                          match_index=MATCH)
  targets = targets._replace(ss_i2t=ss_i2t, ss_t2i=ss_t2i)
  images, texts = mcad.top_k_pairs(top_i2t, top_t2i)
  hidden = teacher["hidden"][images, texts]
  integrated = MODULE.apply({"params": params}, teacher["ds_image"], teacher["ds_text"],
                            hidden[0], hidden[1], top_i2t, top_t2i)
  student = similarity_logits(student_image, student_text, student_tau)
  d_t, fai, fat = mcad.integrated_logits(student_image, student_text, student_tau, integrated,
                                         top_i2t, top_t2i)
  # eq. 17 needs teacher features of the student's width: here the dual features' first E dims.
  fa_p = mcad.cross_alignment_logits(student_image, student_text, student_tau,
                                     teacher["ds_image"][:, :E], teacher["ds_text"][:, :E],
                                     teacher["ds_tau"])
  losses = {"L_GT": mcad.gt_loss(*student), "L_CLIP": mcad.clip_loss(*student, targets),
            "L_ALBEF": mcad.albef_loss(*student, targets),
            "L_CLIP_FA": mcad.clip_fa_loss(*fa_p, targets),
            "L_MT": mcad.mt_loss(student, d_t, targets),
            "L_MT_FA": mcad.mt_fa_loss(fai, fat, targets)}
  values = {name: value for name, (value, _) in losses.items()}
  return sum(values.values()), (values, d_t[0])


def jax_inputs(b):
  teacher = {name: f32(b[name]) for name in ("ds_image", "ds_text", "hidden", "itm")}
  teacher["ds_tau"] = jnp.float32(b["ds_tau"])
  return f32(b["s_image"]), f32(b["s_text"]), jnp.float32(b["s_tau"]), teacher


# ------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("n, k", [(6, 2), (5, 5)])   # (5, 5): k = n, every pair gated
def test_module_and_objective_match_numpy_pair_by_pair(n, k):
  b = batch(n, n)
  params = init(b, k)
  _, (values, teacher_i2t) = jax.jit(objective, static_argnums=5)(params, *jax_inputs(b), k)
  ref = np_objective(jax.device_get(params), b, k)
  np.testing.assert_allclose(values["L_MT"], ref["L_MT"], rtol=2e-5)
  np.testing.assert_allclose(values["L_MT_FA"], ref["L_MT_FA"], rtol=2e-5)
  np.testing.assert_allclose(jax.nn.softmax(teacher_i2t), ref["d_t"][0], rtol=2e-5, atol=1e-7)

  t = ref["t"]
  g1, g2 = apply(params, b, jnp.asarray(t["p_i2t"]), jnp.asarray(t["p_t2i"]), method="gates")
  np_g1, np_g2, image_t, text_t = np_module(jax.device_get(params), b, t["p_i2t"], t["p_t2i"])
  gated = np_gated(t["p_i2t"], t["p_t2i"], n)
  assert gated.all() == (k == n)
  for got, want in ((g1, np_g1), (g2, np_g2)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[~gated] == 0)                # exactly zero outside the top-k
    assert np.all(np.any(np.asarray(got)[gated] != 0, axis=-1))
  fused = apply(params, b, jnp.asarray(t["p_i2t"]), jnp.asarray(t["p_t2i"]))
  rows = np.arange(n)[:, None]
  np.testing.assert_allclose(fused.text_i2t, text_t[rows, t["p_i2t"]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fused.image_t2i, image_t[t["p_t2i"], rows], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(fused.image_i2t, axis=-1), 1.0, rtol=1e-5)


def test_gates_hand_worked_are_exactly_zero_outside_the_top_k():
  # n = 3, k = 1: P_i2t = image 0 -> text 1, 1 -> 1, 2 -> 0; P_t2i = text 0 -> image 2,
  # 1 -> image 0, 2 -> image 2. Gated pairs (image, text): (0, 1), (1, 1), (2, 0), (2, 2).
  b = batch(1, 3)
  params = init(b, 1)
  top_i2t, top_t2i = jnp.asarray([[1], [1], [0]]), jnp.asarray([[2], [0], [2]])
  g1, g2 = apply(params, b, top_i2t, top_t2i, method="gates")
  expected = np.zeros((3, 3), bool)
  expected[[0, 1, 2, 2], [1, 1, 0, 2]] = True
  for g in (g1, g2):
    np.testing.assert_array_equal(np.any(np.asarray(g) != 0, axis=-1), expected)
  # The gate-closed features are g3 / g4 alone: alpha and H do not reach them.
  fused = apply(params, b, top_i2t, top_t2i)
  other = apply({**params, "alpha": jnp.float32(5.0)}, {**b, "hidden": b["hidden"] * 3}, top_i2t,
                top_t2i)
  np.testing.assert_array_equal(fused.image, other.image)
  np.testing.assert_array_equal(fused.text, other.text)
  assert not np.allclose(fused.text_i2t, other.text_i2t)


@pytest.mark.parametrize("depth", [1, 3])
def test_mlp_depth_and_width_are_fields(depth):
  module = IntegrationModule(embed_dim=E, mlp_dim=9, mlp_depth=depth)
  params = init(batch(0, 4), 2, module)
  for g, width in (("g1", DH), ("g2", DH), ("g3", DT), ("g4", DI)):
    shapes = [params[g][f"layer_{i}"]["kernel"].shape for i in range(depth)]
    assert len(params[g]) == depth
    assert shapes == ([(width, E)] if depth == 1 else
                      [(width, 9)] + [(9, 9)] * (depth - 2) + [(9, E)])
  assert params["alpha"].shape == () and params["log_temperature"].shape == ()
  with pytest.raises(ValueError, match="depth"):
    init(batch(0, 4), 2, IntegrationModule(embed_dim=E, mlp_depth=0))


def test_gradients_reach_student_and_module_alpha_included_never_a_teacher():
  b = batch(2, 6)
  params = init(b, 2)
  student_image, student_text, student_tau, teacher = jax_inputs(b)
  grad_fn = jax.jit(jax.grad(lambda *a: objective(*a, 2)[0], argnums=(0, 1, 2, 3, 4)))
  g_params, g_image, g_text, g_tau, g_teacher = grad_fn(params, student_image, student_text,
                                                        student_tau, teacher)
  for path, g in jax.tree_util.tree_leaves_with_path(g_params):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
  assert g_params["alpha"] != 0 and g_params["log_temperature"] != 0
  for g in (g_image, g_text, g_tau):
    assert np.all(np.isfinite(g)) and np.any(g != 0)
  for name, g in g_teacher.items():
    assert np.all(g == 0), name


def test_eight_devices_equal_one_device():
  n, k = 16, 3
  b = batch(3, n)
  params = init(b, k)
  args = (params, *jax_inputs(b))
  grad_fn = jax.value_and_grad(lambda *a: objective(*a, k), argnums=(0, 1, 2, 3), has_aux=True)

  def run(mesh):
    data, rep = batch_sharding(mesh), replicated(mesh)
    teacher = {"ds_image": data, "ds_text": data, "ds_tau": rep, "hidden": data, "itm": data}
    fn = jax.jit(grad_fn, in_shardings=(rep, data, data, rep, teacher))
    return jax.device_get(fn(*args))

  mesh = make_mesh()
  assert mesh.devices.size == 8
  (loss8, (values8, _)), grads8 = run(mesh)
  (loss1, (values1, _)), grads1 = run(make_mesh(devices=jax.devices()[:1]))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for name in values1:
    np.testing.assert_allclose(values8[name], values1[name], rtol=1e-5, err_msg=name)
  jax.tree.map(lambda g8, g1: np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-6),
               grads8, grads1)
