"""Gradient accumulation through the embedding cache (train/accumulate.py, config.train.accum_steps):
4 microbatches of 32 give the loss and gradients of one batch of 128 (dual, with and without
mined negatives; LoopITR's ITC warm-up), a whole train step the same params, microbatches stay
sharded over the 8 devices with no data movement, and the config errors."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conftest import random_pairs, recipe_config
from jaxdistill import methods
from jaxdistill.config import ConfigError, validate
from jaxdistill.data.tokenizer import SpecialIds
from jaxdistill.methods import dual as dual_method
from jaxdistill.methods import loopitr as loopitr_method
from jaxdistill.methods.base import STUDENT
from jaxdistill.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated
from jaxdistill.train.accumulate import (AccumulableLoss, accumulated_value_and_grad,
                                         join_microbatches, split_microbatches)
from jaxdistill.train.loop import build_state
from jaxdistill.train.state import create_train_state
from jaxdistill.train.step import make_train_step

B, MICRO, L, K = 128, 4, 12, 1
LOSS_TOL, GRAD_TOL = 1e-5, 1e-5


def _dual_config(accum=1, k=0, dropout=0.0):
  c = recipe_config("dual", "tiny")
  c.model.vocab_size, c.model.max_len = 40, L
  c.model.dropout_rate = dropout
  c.batch_size = B
  c.dual.hard_negatives = k
  c.train.accum_steps = accum
  return c


def _loopitr_config(accum=1):
  c = recipe_config("loopitr", "tiny")
  c.model.vocab_size, c.model.max_len = 40, L
  c.batch_size = B
  c.loopitr.itc_only_steps = c.train.num_steps
  c.train.accum_steps = accum
  return c


def _batch(k=0, seed=0):
  rng = np.random.default_rng(seed)
  rows = random_pairs(rng, B * (1 + k), L, min_len=6, bracket=True)
  ids, mask, images = rows["text_ids"], rows["text_mask"], rows["image"]
  batch = {"image": images[:B], "text_ids": ids[:B], "text_mask": mask[:B],
           "image_id": (np.arange(B) // 2).astype(np.int32)}   # two captions share an image
  if k:
    batch.update(neg_text_ids=ids[B:].reshape(B, k, L), neg_text_mask=mask[B:].reshape(B, k, L),
                 neg_text_owner=rng.integers(0, B // 2, (B, k)).astype(np.int32),
                 neg_image=images[B:].reshape(B, k, *images.shape[1:]),
                 neg_image_owner=rng.integers(0, B // 2, (B, k)).astype(np.int32))
  return batch


def _dual_loss(config, mesh):
  return dual_method.build(config, mesh, None, 1).loss_fn


def _loopitr_itc_loss(config, mesh):
  bench = types.SimpleNamespace(special_ids=SpecialIds())
  recipe = loopitr_method.build(config, mesh, bench, steps_per_epoch=10)
  return recipe.warmup[1]


def _params(method, config):
  """The student's params of `method` (dual_method or loopitr_method) at PRNGKey(0)."""
  mesh = make_mesh(devices=jax.devices()[:1])
  recipe = method.build(config, mesh, types.SimpleNamespace(special_ids=SpecialIds()), 10)
  return {STUDENT: recipe.modules[STUDENT].init(jax.random.PRNGKey(0))}


def _max_diffs(a, b):
  """(max |loss difference|, max over params of max |grad difference| / max(1, max |grad|))."""
  loss = float(abs(a[0] - b[0]))
  grads = max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(x - y).max() / max(1.0, np.abs(y).max())), a[1], b[1])))
  return loss, grads


def _full_and_accumulated(loss_fn, params, batch, mesh, frozen=None):
  """(loss, grads) of the whole batch at once and in loss_fn.steps microbatches, both jitted on
  `mesh` with the batch sharded over its batch axes (`frozen` replicated)."""
  frozen = jax.device_put(frozen or {}, replicated(mesh))
  rep, rows = replicated(mesh), batch_sharding(mesh)
  shardings = {k: rows for k in batch}
  placed = {k: jax.device_put(v, rows) for k, v in batch.items()}
  rng, step = jax.random.PRNGKey(3), jnp.asarray(0, jnp.int32)

  def full(p, b):
    (value, _), grads = jax.value_and_grad(
        lambda q: loss_fn(q, frozen, {}, b, rng, step)[:2], has_aux=True)(p)
    return value, grads

  def accumulated(p, b):
    (value, _), grads = accumulated_value_and_grad(loss_fn, p, frozen, {}, b, rng, step,
                                                   shardings)
    return value, grads

  params = jax.device_put(params, rep)
  one = jax.device_get(jax.jit(full)(params, placed))
  many = jax.device_get(jax.jit(accumulated)(params, placed))
  return one, many


def test_leaner_faster_with_its_teacher_four_microbatches_equal_one_batch():
  """Leaner-and-Faster's stage 2 (paper 000 §3.2.2: InfoNCE + KD + HN, both towers) in 4
  microbatches of 32: the teacher's embeddings are computed once per microbatch (features) and
  the loss and gradients are those of the batch of 128."""
  stage, k = "stage2", K
  from jaxdistill.methods import leaner_faster
  from jaxdistill.models.build import build_model, init_params, towers
  from jaxdistill.teachers.workdir import from_towers
  config = _dual_config(accum=MICRO)
  config.method = "leaner_faster"
  config.leaner_faster = leaner_faster.section()
  config.leaner_faster.update(stage=stage, tower="both", hard_negatives=k)
  model = build_model(config.model)
  teacher = from_towers("t", towers(model), init_params(model, config.model, jax.random.PRNGKey(1)),
                        temperature=0.05)
  loss_fn = leaner_faster.make_loss_fn(config, model, teacher)
  assert isinstance(loss_fn, AccumulableLoss) and loss_fn.features is not None
  params = {STUDENT: init_params(model, config.model, jax.random.PRNGKey(0))}
  one, many = _full_and_accumulated(loss_fn, params, _batch(k), make_mesh(),
                                    frozen={"teacher": teacher.params})
  _assert_same(one, many, f"leaner_faster {stage} (k={k}), {MICRO} x {B // MICRO} vs {B}")


def _assert_same(one, many, what):
  loss_diff, grad_diff = _max_diffs(many, one)
  print(f"\n{what}: max |loss diff| {loss_diff:.3g}, max grad diff (relative to the largest "
        f"gradient entry, >= 1) {grad_diff:.3g}")
  np.testing.assert_allclose(many[0], one[0], rtol=LOSS_TOL, atol=LOSS_TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=GRAD_TOL, atol=GRAD_TOL * max(1.0, float(np.abs(b).max()))), many[1], one[1])
  # the temperature's gradient comes straight through the loss (and is not zero)
  temp = [x for path, x in jax.tree_util.tree_leaves_with_path(one[1])
          if "temperature" in jax.tree_util.keystr(path)]
  assert temp and all(np.all(np.abs(t) > 0) for t in temp)


@pytest.mark.parametrize("k", [0, K])
def test_dual_four_microbatches_equal_one_batch(k):
  config = _dual_config(accum=MICRO, k=k)
  mesh = make_mesh()
  assert mesh.size == 8
  loss_fn = _dual_loss(config, mesh)
  assert isinstance(loss_fn, AccumulableLoss) and loss_fn.steps == MICRO
  one, many = _full_and_accumulated(loss_fn, _params(dual_method, config), _batch(k), mesh)
  _assert_same(one, many, f"dual (hard_negatives={k}), {MICRO} x {B // MICRO} vs {B}")


def test_loopitr_itc_warmup_four_microbatches_equal_one_batch():
  config = _loopitr_config(accum=MICRO)
  mesh = make_mesh()
  loss_fn = _loopitr_itc_loss(config, mesh)
  assert isinstance(loss_fn, AccumulableLoss) and loss_fn.steps == MICRO
  one, many = _full_and_accumulated(loss_fn, _params(loopitr_method, config), _batch(), mesh)
  _assert_same(one, many, f"LoopITR ITC warm-up, {MICRO} x {B // MICRO} vs {B}")


def test_with_dropout_the_recompute_matches_the_cache():
  """With dropout each microbatch draws its own mask (key fold_in(rng, j)); the accumulated
  gradient is the exact gradient of that objective: the recompute draws the cache's masks."""
  config = _dual_config(accum=MICRO, dropout=0.1)
  mesh = make_mesh()
  loss_fn = _dual_loss(config, mesh)
  params, batch = _params(dual_method, config), _batch()
  rng, step = jax.random.PRNGKey(3), jnp.asarray(0, jnp.int32)
  shardings = {k: batch_sharding(mesh) for k in batch}

  def direct(p, b):   # the same objective, differentiated in one piece
    micro = split_microbatches(b, MICRO)
    emb = [loss_fn.embed(p, {}, jax.tree.map(lambda x: x[j], micro), jax.random.fold_in(rng, j))
           for j in range(MICRO)]
    emb = join_microbatches(jax.tree.map(lambda *xs: jnp.stack(xs), *emb))
    return loss_fn.loss_from_embeddings(p, {}, {}, emb, b, rng, step)[0]

  placed = jax.device_put(batch, shardings)
  one = jax.device_get(jax.jit(jax.value_and_grad(direct))(params, placed))
  many = jax.device_get(jax.jit(lambda p, b: (lambda r: (r[0][0], r[1]))(
      accumulated_value_and_grad(loss_fn, p, {}, {}, b, rng, step, shardings)))(params, placed))
  plain = jax.device_get(jax.jit(lambda p, b: loss_fn(p, {}, {}, b, rng, step)[0])(params, placed))
  assert abs(float(plain) - float(one[0])) > 1e-6   # dropout is on: other masks, other loss
  _assert_same(one, many, "dual with dropout 0.1 against its per-microbatch-mask objective")


def test_microbatches_stay_sharded_without_data_movement():
  """Microbatch j = rows j, j + 4, ...: every device's rows of it are its own rows, so the split
  is a local reshape (no collective in the compiled program) and each microbatch is sharded
  over all 8 devices, 4 rows each."""
  mesh = make_mesh()
  x = jax.device_put(np.arange(B * 3, dtype=np.float32).reshape(B, 3), batch_sharding(mesh))
  stacked = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
  split = jax.jit(lambda a: split_microbatches(a, MICRO), out_shardings=stacked)
  hlo = split.lower(x).compile().as_text()
  for collective in ("all-to-all", "collective-permute", "all-gather", "all-reduce"):
    assert collective not in hlo, collective
  out = split(x)
  np.testing.assert_array_equal(np.asarray(out)[1], np.asarray(x)[1::MICRO])
  for shard in out.addressable_shards:
    assert shard.data.shape == (MICRO, B // MICRO // 8, 3)
  np.testing.assert_array_equal(np.asarray(join_microbatches(out)), np.asarray(x))


def _train(config, recipe, mesh, batches, sgd=None):
  """Params and metrics after one make_train_step per batch: the trainer's state, optimiser and
  shardings (build_state), or with sgd=lr plain SGD on a replicated state."""
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
  built = build_state(recipe, config, mesh, spec)
  tx, shardings, state = built["tx"], built["shardings"], built["init"]()
  if sgd is not None:
    tx = optax.sgd(sgd)
    state = create_train_state(jax.device_get(state.params), tx, jax.random.PRNGKey(0))
    shardings = dict(shardings, state=jax.tree.map(lambda _: replicated(mesh), state))
    state = jax.device_put(state, shardings["state"])
  step = make_train_step(recipe.loss_fn, tx, {}, built["trainable"], shardings)
  metrics = []
  for b in batches:
    state, m = step(state, jax.device_put(b, shardings["batch"]), {})
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics


@pytest.mark.parametrize("optimizer", [pytest.param("sgd", marks=pytest.mark.exhaustive), "adamw"])
def test_train_step_with_accum_steps_4_equals_accum_steps_1(optimizer):
  """Two steps of the dual recipe's train step (make_train_step, the trainer's shardings):
  the same losses, gradient norms and params with accum_steps=4 as with 1, under plain SGD and
  under the configured AdamW. Adam moves an entry by ~lr * sign(grad) wherever |grad| >> eps,
  also where the gradient is rounding noise: the attention key biases, whose exact gradient is
  0 (softmax ignores a shift shared by a query's logits), are only checked to move by <= lr."""
  mesh = make_mesh()
  batches = [_batch(seed=1), _batch(seed=2)]
  runs = {}
  for accum in (1, MICRO):
    config = _dual_config(accum=accum)
    recipe = dual_method.build(config, mesh, None, 1)
    assert (recipe.loss_fn.steps > 1) == (accum > 1)
    runs[accum] = _train(config, recipe, mesh, batches, 0.5 if optimizer == "sgd" else None)
  (p1, m1), (p4, m4) = runs[1], runs[MICRO]
  for a, b in zip(m4, m1):
    assert set(a) == set(b)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  lr = _dual_config().optim.learning_rate
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p4), jax.tree.leaves(p1)):
    name = jax.tree_util.keystr(path)
    noise = optimizer == "adamw" and "['key']['bias']" in name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2 * lr if noise else 1e-5, err_msg=name)
    worst = worst if noise else max(worst, float(np.abs(a - b).max()))
  print(f"\n{optimizer}: max |param diff| after 2 steps {worst:.3g} (key biases aside)")


# ------------------------------------------------------------------------------ config errors


def _error(config, num_devices=8, recipe_only=False):
  with pytest.raises(ConfigError) as e:
    if not recipe_only:   # (config.validate also checks paths, e.g. an init_from run's)
      validate(config, num_devices)
    methods.validate(config)
  message = str(e.value)
  assert "\n" not in message and "--config.train.accum_steps=" in message
  return message


def test_config_errors():
  config = _dual_config(accum=0)
  assert "positive integer" in _error(config)
  config.train.accum_steps = 3      # 128 / 3: no whole microbatches
  message = _error(config)
  assert "1, 2, 4, 8, 16" in message and "--config.batch_size=128" in message
  config.train.accum_steps = 32     # microbatches of 4 rows on 8 devices
  assert "1, 2, 4, 8, 16" in _error(config)
  for name in ("cprd", "mcad", "unimodal_kd"):
    other = recipe_config(name, "tiny")
    other.batch_size, other.train.accum_steps = B, MICRO
    message = _error(other, recipe_only=True)
    assert f"the {other.method} recipe's loss" in message
    assert "--config.train.accum_steps=1" in message
  loopitr = _loopitr_config(accum=MICRO)
  loopitr.loopitr.itc_only_steps = 2      # the full LoopITR loss from step 3 on: refused
  message = _error(loopitr)
  assert f"--config.loopitr.itc_only_steps={loopitr.train.num_steps}" in message
  for ok in (_dual_config(accum=MICRO), _dual_config(accum=16), _loopitr_config(accum=MICRO)):
    validate(ok, 8)
    methods.validate(ok)
  from jaxdistill.methods import leaner_faster      # each pipeline stage's recipe accumulates
  methods._require_accumulation(recipe_config("leaner_faster", "tiny"), leaner_faster)
