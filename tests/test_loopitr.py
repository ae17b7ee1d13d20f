"""LoopITR recipe: 8-device equivalence, stop-grad, frozen teachers, negative choice, warm-up,
init_from a dual run, config errors."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_devices_agree, loss_and_grads, one_device_mesh, random_pairs,
                      recipe_config)
from jaxdistill import methods
from jaxdistill.config import ConfigError
from jaxdistill.data import pipeline
from jaxdistill.data.tokenizer import SpecialIds
from jaxdistill.methods import loopitr as loopitr_method
from jaxdistill.methods.base import STUDENT
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.train.loop import build_state

B = 16
BENCH = types.SimpleNamespace(special_ids=SpecialIds())   # all that build() reads of the benchmark


def _config(**loopitr_overrides):
  c = recipe_config("loopitr", "tiny")
  c.model.vocab_size = 40
  c.model.max_len = 12
  for k, v in loopitr_overrides.items():
    c.loopitr[k] = v
  return c


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  batch = random_pairs(rng, B, 12, min_len=6, bracket=True)
  return dict(batch, image_id=np.arange(B, dtype=np.int32))


def _recipe(config, mesh, bench=BENCH):
  return loopitr_method.build(config, mesh, bench, steps_per_epoch=10)


def _run(config, mesh, params, frozen=None, step=100):
  return loss_and_grads(_recipe(config, mesh).loss_fn, mesh, params, _batch(), frozen, step=step)


@pytest.fixture(scope="module")
def params():
  recipe = _recipe(_config(), one_device_mesh())
  assert list(recipe.modules) == [STUDENT]
  return {STUDENT: recipe.modules[STUDENT].init(jax.random.PRNGKey(0))}


@pytest.mark.parametrize("overrides", [
    {}, pytest.param({"negative_sampling": "random", "itm_negatives": "hard"}, marks=pytest.mark.exhaustive)])
def test_eight_devices_equal_one_device(params, overrides):
  config = _config(**overrides)
  mesh8 = make_mesh()
  assert mesh8.size == 8
  assert_devices_agree(_run(config, mesh8, params), _run(config, one_device_mesh(), params))


def _distill_only(stop_gradient, **overrides):
  return _config(itc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, distill_warmup_steps=0,
                 stop_gradient=stop_gradient, **overrides)


def _norm(tree):
  return float(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_keeps_distillation_off_the_cross_encoder(params, stop_gradient):
  out = _run(_distill_only(stop_gradient), one_device_mesh(), params)
  assert float(out.metrics["distill"]) > 0 and np.isclose(out.loss, out.metrics["distill"])
  grads = out.grads[STUDENT]
  cross = {k: v for k, v in grads.items() if "cross" in k.lower() or "itm" in k.lower()}
  assert cross, sorted(grads)
  if stop_gradient:
    assert _norm(cross) == 0.0
  else:
    assert _norm(cross) > 0.0
  towers = {k: v for k, v in grads.items() if k not in cross}
  assert _norm(towers) > 0.0   # the student (dual encoder) always learns


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Finished tiny runs with random params: a dual encoder (seed 7) and a LoopITR network (seed 3);
  (root, their benchmark, the dual run's student params)."""
  from jaxdistill.teachers.workdir import init_workdir
  root = tmp_path_factory.mktemp("loopitr_runs")
  bench, dual_params = init_workdir(recipe_config("dual", "tiny"), str(root / "dual"), seed=7)
  init_workdir(recipe_config("loopitr", "tiny"), str(root / "loopitr"), seed=3)
  return root, bench, dual_params


@pytest.mark.parametrize("teacher", ["momentum", "offline"])
def test_frozen_teacher_gets_no_gradient(params, runs, teacher):
  """The momentum teacher (frozen["ema"]["student"]) and the offline run (frozen["offline"],
  config.teachers.offline) are inputs of the loss, never differentiated, even without stop-grad."""
  config = _distill_only(False, teacher=teacher)
  config.teachers.offline.path = str(runs[0] / "loopitr")
  methods.validate(config)
  recipe = _recipe(config, one_device_mesh(), runs[1])
  if teacher == "momentum":
    assert dict(recipe.ema) == {STUDENT: config.loopitr.momentum} and not recipe.frozen
    frozen = {"ema": {STUDENT: jax.tree.map(lambda x: x * 1.01, params[STUDENT])}}
  else:
    assert not recipe.ema and set(recipe.frozen) == {"offline"}
    frozen = dict(recipe.frozen)
  batch = jax.tree.map(jnp.asarray, _batch())
  loss = lambda f: recipe.loss_fn(params, f, {}, batch, jax.random.PRNGKey(0), jnp.asarray(5))[:2]
  (_, metrics), grad_frozen = jax.jit(jax.value_and_grad(loss, has_aux=True))(frozen)
  assert float(metrics["distill"]) > 0
  assert _norm(grad_frozen) == 0.0


def test_choose_negatives_hard_and_random():
  logits = jnp.array([[9.0, 5.0, 7.0, 1.0], [3.0, 9.0, 8.0, 2.0], [4.0, 6.0, 9.0, 5.0]])
  same = jnp.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]], bool)  # col 3 = image 0's 2nd caption
  hard = np.asarray(loopitr_method.choose_negatives(logits, same, 2, "hard", jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(hard, [[2, 1], [2, 0], [1, 3]])
  rand = np.asarray(loopitr_method.choose_negatives(logits, same, 2, "random", jax.random.PRNGKey(1)))
  for row, picks in enumerate(rand):
    assert len(set(picks)) == 2 and not np.asarray(same)[row, picks].any()
  # mixed: each row is its hard pick or its random pick, and over many rows both occur.
  big = jax.random.normal(jax.random.PRNGKey(2), (400, 6))
  none = jnp.zeros((400, 6), bool)
  key = jax.random.PRNGKey(3)
  mixed = np.asarray(loopitr_method.choose_negatives(big, none, 1, "mixed", key))[:, 0]
  top = np.asarray(jnp.argmax(big, axis=1))
  random = np.asarray(loopitr_method.choose_negatives(big, none, 1, "random",
                                                      jax.random.split(key)[1]))[:, 0]
  assert np.all((mixed == top) | (mixed == random))
  assert 0.35 < np.mean(mixed == top) < 0.75 and np.any((mixed == random) & (random != top))


def test_distill_weight_warms_up_linearly():
  w = [float(loopitr_method.distill_weight(jnp.asarray(s), 1.0, 10)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(w, [0.0, 0.5, 1.0, 1.0])
  assert float(loopitr_method.distill_weight(jnp.asarray(0), 0.7, 0)) == pytest.approx(0.7)


def test_init_from_a_dual_run(runs):
  """config.init_from (the trainer's initial state): the student's dual part starts as the
  dual-encoder run's params (towers, projections, temperature); the cross encoder and heads are
  freshly initialised, as without init_from."""
  root, bench, dual_params = runs
  dual = recipe_config("dual", "tiny")
  config = _config()
  config.model.vocab_size, config.model.max_len = bench.vocab_size, dual.model.max_len
  mesh = one_device_mesh()
  spec = pipeline.global_batch_spec(random_pairs(np.random.default_rng(0), B, dual.model.max_len))

  def initial_params(init_from):
    config.init_from = init_from
    state = build_state(_recipe(config, mesh, bench), config, mesh, spec)["init"]()
    return jax.device_get(state.params[STUDENT])

  started = initial_params(({"source": f"workdir:{root / 'dual'}",
                             "mapping": (("student/dual/", "student/"),)},))
  jax.tree.map(np.testing.assert_array_equal, started["dual"], dual_params)
  fresh = initial_params(())
  jax.tree.map(np.testing.assert_array_equal, started["cross"], fresh["cross"])
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(started["dual"]), jax.tree.leaves(fresh["dual"])))


@pytest.mark.parametrize("key,value,needle", [
    ("loopitr.num_negatives", 16, "--config.loopitr.num_negatives=16 needs 1 <= m < batch_size=16"),
    ("loopitr.negative_sampling", "hardest", "--config.loopitr.negative_sampling='hardest'"),
    ("loopitr.teacher", "frozen", "--config.loopitr.teacher='frozen' is not valid: use one of"),
    ("model.kind", "dual", "set --config.model.kind=loopitr"),
    ("loopitr.teacher", "offline", "--config.teachers.offline.kind=workdir needs "
                                   "--config.teachers.offline.path"),
])
def test_bad_settings_name_the_key_and_the_fix(key, value, needle):
  config = _config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError) as info:
    methods.validate(config)
  assert needle in str(info.value)
  methods.validate(_config())


def test_itc_only_warm_up_is_the_joint_loss_without_its_work(params):
  """During loopitr.itc_only_steps the warm-up step's loss gives the joint loss's value and
  gradients (its other terms are weighted 0) and its compiled step costs fewer FLOPs."""
  config = _config(itc_only_steps=5)
  mesh = one_device_mesh()
  recipe = _recipe(config, mesh)
  steps, warm = recipe.warmup
  assert steps == 5
  joint = loss_and_grads(recipe.loss_fn, mesh, params, _batch(), step=2)
  itc = loss_and_grads(warm, mesh, params, _batch(), step=2)
  np.testing.assert_allclose(itc.loss, joint.loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               itc.grads, joint.grads)
  assert "itm" in joint.metrics and "itm" not in itc.metrics

  def flops(loss_fn):
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, {}, {}, b, jax.random.PRNGKey(0), jnp.int32(2))[0]))
    return grad.lower(params, _batch()).compile().cost_analysis()["flops"]
  assert flops(warm) < 0.5 * flops(recipe.loss_fn)
  assert _recipe(_config(itc_only_steps=0), mesh).warmup is None


@pytest.mark.parametrize("zeroed, absent", [
    ({"mlm_weight": 0.0}, "mlm_acc"),
    pytest.param({"itm_weight": 0.0}, "itm_acc", marks=pytest.mark.exhaustive),
    pytest.param({"distill_weight": 0.0}, "distill_txt", marks=pytest.mark.exhaustive)])
def test_a_zero_weight_term_is_not_computed(params, zeroed, absent):
  """A loss term of weight 0 gives the same loss and gradients as the full loss with that
  weight 0 would, without its work: its metrics are absent and the compiled step is cheaper."""
  mesh = one_device_mesh()
  full = _recipe(_config(), mesh).loss_fn
  skip = _recipe(_config(**zeroed), mesh).loss_fn
  key, step, batch = jax.random.PRNGKey(0), jnp.int32(100), jax.tree.map(jnp.asarray, _batch())
  value = lambda fn: (lambda p: fn(p, {}, {}, batch, key, step)[0])
  (name, _), = zeroed.items()
  term = {"mlm_weight": "mlm", "itm_weight": "itm", "distill_weight": "distill"}[name]
  _, metrics, _ = full(params, {}, {}, batch, key, step)
  _, skipped_metrics, _ = skip(params, {}, {}, batch, key, step)
  assert absent in metrics and absent not in skipped_metrics
  weight = 1.0 if term != "distill" else float(metrics["distill_weight"])
  np.testing.assert_allclose(value(skip)(params), value(full)(params) - weight * metrics[term],
                             rtol=1e-5)
  flops = lambda fn: jax.jit(jax.grad(value(fn))).lower(params).compile().cost_analysis()["flops"]
  assert flops(skip) < flops(full)


def test_mlm_head_on_masked_positions_equals_the_full_head(params):
  """The vocabulary head at the masked positions alone (LoopITRModel.mlm_logits_at) gives
  BERT's MLM loss over every position (mlm_logits), value and gradients."""
  from jaxdistill.data.masking import mask_tokens
  from jaxdistill.losses.matching import mlm_loss
  from jaxdistill.models.loopitr import LoopITRModel
  config = _config(itm_weight=0.0, distill_negatives="none")
  recipe = _recipe(config, one_device_mesh())
  model = recipe.modules[STUDENT].model
  batch, key = jax.tree.map(jnp.asarray, _batch()), jax.random.PRNGKey(3)
  k_mlm = jax.random.split(key, 4)[3]

  def full(p):
    q = p[STUDENT]
    ids, mask = batch["text_ids"], batch["text_mask"]
    masked, labels, weights = mask_tokens(ids, mask, k_mlm, probability=0.15, vocab_size=40,
                                          special=SpecialIds())
    _, img_tok = model.apply({"params": q}, batch["image"], method=LoopITRModel.encode_image)
    _, tok = model.apply({"params": q}, masked, mask, method=LoopITRModel.encode_text)
    logits = model.apply({"params": q}, tok, mask, img_tok, method=LoopITRModel.mlm_logits)
    return mlm_loss(logits, labels, weights)[0]

  def gathered(p):
    return recipe.loss_fn(p, {}, {}, batch, key, jnp.int32(100))[1]["mlm"]

  _, metrics, _ = recipe.loss_fn(params, {}, {}, batch, key, jnp.int32(100))
  assert float(metrics["mlm_dropped"]) == 0.0
  np.testing.assert_allclose(gathered(params), full(params), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.grad(gathered)(params), jax.grad(full)(params))
