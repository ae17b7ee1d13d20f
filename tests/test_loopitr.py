"""LoopITR recipe: 8-device equivalence, stop-grad, negative choice, warm-up."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.methods import loopitr as loopitr_method
from jaxdistill.parallel.mesh import batch_sharding, make_mesh, replicated

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from configs import loopitr as loopitr_config  # noqa: E402

B = 16


def _config(**loopitr_overrides):
  c = loopitr_config.get_config("tiny")
  c.model.vocab_size = 40
  c.model.max_len = 12
  for k, v in loopitr_overrides.items():
    c.loopitr[k] = v
  return c


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 40, (B, 12)).astype(np.int32)
  ids[:, 0] = 2
  lengths = rng.integers(6, 12, B)
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, 0).astype(np.int32)
  ids[np.arange(B), lengths - 1] = 3
  return {"image": rng.normal(size=(B, 56, 56, 1)).astype(np.float32), "text_ids": ids,
          "text_mask": mask, "image_id": np.arange(B, dtype=np.int32) // 1}


def _loss_and_grads(config, mesh, params, batch, step=100, teacher=None):
  recipe = loopitr_method.build(config, mesh, steps_per_epoch=10)
  fn = jax.jit(jax.value_and_grad(recipe.loss_fn, has_aux=True),
               in_shardings=(replicated(mesh), None, batch_sharding(mesh), None))
  return jax.device_get(fn(params, teacher, batch, jnp.asarray(step)))


@pytest.fixture(scope="module")
def params():
  config = _config()
  recipe = loopitr_method.build(config, make_mesh(devices=jax.devices()[:1]), steps_per_epoch=10)
  return recipe.init_params(jax.random.PRNGKey(0))


@pytest.mark.parametrize("overrides", [{}, {"negative_sampling": "random", "itm_negatives": "hard"}])
def test_eight_devices_equal_one_device(params, overrides):
  config = _config(**overrides)
  batch = _batch()
  mesh8 = make_mesh()
  assert mesh8.size == 8
  (l8, m8), g8 = _loss_and_grads(config, mesh8, params, batch)
  (l1, m1), g1 = _loss_and_grads(config, make_mesh(devices=jax.devices()[:1]), params, batch)
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # Gradients are sums over the batch reduced across devices in another order: compare at 1e-5
  # relative to each parameter's largest gradient (float32 summation-order noise).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max()))), g8, g1)


def _distill_only(stop_gradient):
  return _config(itc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, distill_warmup_steps=0,
                 stop_gradient=stop_gradient)


def _norm(tree):
  return float(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_keeps_distillation_off_the_cross_encoder(params, stop_gradient):
  mesh = make_mesh(devices=jax.devices()[:1])
  (loss, parts), grads = _loss_and_grads(_distill_only(stop_gradient), mesh, params, _batch())
  assert float(parts["distill"]) > 0 and np.isclose(loss, parts["distill"])
  cross = {k: v for k, v in grads.items() if "cross" in k.lower() or "itm" in k.lower()}
  assert cross, sorted(grads)
  if stop_gradient:
    assert _norm(cross) == 0.0
  else:
    assert _norm(cross) > 0.0
  towers = {k: v for k, v in grads.items() if k not in cross}
  assert _norm(towers) > 0.0   # the student (dual encoder) always learns


def test_offline_teacher_gets_no_gradient(params):
  mesh = make_mesh(devices=jax.devices()[:1])
  recipe = loopitr_method.build(_distill_only(False), mesh, steps_per_epoch=10)
  teacher = jax.tree.map(lambda x: x * 1.01, params)
  grad_teacher = jax.grad(lambda t: recipe.loss_fn(params, t, _batch(), jnp.asarray(5))[0])(teacher)
  assert _norm(grad_teacher) == 0.0


def test_choose_negatives_hard_and_random():
  logits = jnp.array([[9.0, 5.0, 7.0, 1.0], [3.0, 9.0, 8.0, 2.0], [4.0, 6.0, 9.0, 5.0]])
  same = jnp.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]], bool)  # col 3 = image 0's 2nd caption
  hard = np.asarray(loopitr_method.choose_negatives(logits, same, 2, "hard", jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(hard, [[2, 1], [2, 0], [1, 3]])
  rand = np.asarray(loopitr_method.choose_negatives(logits, same, 2, "random", jax.random.PRNGKey(1)))
  for row, picks in enumerate(rand):
    assert len(set(picks)) == 2 and not np.asarray(same)[row, picks].any()


def test_distill_weight_warms_up_linearly():
  w = [float(loopitr_method.distill_weight(jnp.asarray(s), 1.0, 10)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(w, [0.0, 0.5, 1.0, 1.0])
  assert float(loopitr_method.distill_weight(jnp.asarray(0), 0.7, 0)) == pytest.approx(0.7)


def test_init_towers_from_a_dual_run(tmp_path):
  """loopitr.init_towers_from: the dual part starts as the dual-encoder run's params (towers,
  projections, temperature); the cross encoder and heads are freshly initialised."""
  from configs import dual as dual_config
  from jaxdistill.teachers.workdir import init_workdir
  dual = dual_config.get_config("tiny")
  _, dual_params = init_workdir(dual, str(tmp_path / "dual"), seed=7)
  config = _config(init_towers_from=str(tmp_path / "dual"))
  config.model.vocab_size, config.model.max_len = dual.model.vocab_size, dual.model.max_len
  recipe = loopitr_method.build(config, make_mesh(devices=jax.devices()[:1]), steps_per_epoch=4)
  params = jax.jit(recipe.init_params)(jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, params["dual"], dual_params)
  config.loopitr.init_towers_from = ""
  fresh = loopitr_method.build(config, make_mesh(devices=jax.devices()[:1]), 4).init_params(
      jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, params["cross"], fresh["cross"])
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(params["dual"]), jax.tree.leaves(fresh["dual"])))
