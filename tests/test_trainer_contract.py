"""The training contract with a recipe of two trainable modules and a frozen teacher, built the
way methods/ build recipes: a trainable rule freezes module B (bit-identical after 10 steps),
module A trains at its own learning rate, the teacher receives no gradient, and 8 simulated
devices give the losses and gradients of 1 device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import recipe_config
from jaxdistill.losses.contrastive import contrastive_loss
from jaxdistill.methods.base import Module, Recipe
from jaxdistill.models.build import build_model, init_params, towers
from jaxdistill.parallel.gather import gathered_similarity_logits
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.teachers.base import make_teacher
from jaxdistill.train.loop import build_state
from jaxdistill.train.step import make_train_step

B, L, E, LR_A = 16, 12, 32, 3e-3


class Head(nn.Module):
  """Module B: a linear map of the student's image embedding [B, E] -> [B, E]."""
  @nn.compact
  def __call__(self, x):
    return nn.Dense(E, name="map")(x)


def _recipe(config, mesh):
  """A: the tiny dual encoder; B: Head; teacher: another dual encoder (frozen, make_teacher).
  Loss = ITC over all devices' negatives + MSE(B(A's image emb), teacher image emb)."""
  model = build_model(config.model)
  a, head = towers(model), Head()
  teacher_model = build_model(config.model)
  t = towers(teacher_model)
  teacher = make_teacher("t", init_params(teacher_model, config.model, jax.random.PRNGKey(7)),
                         embed_images=lambda p, x: t.embed_image(p, x)[0])

  def loss_fn(params, frozen, extra, batch, rng, step):
    img = a.embed_image(params["a"], batch["image"])[0]
    txt = a.embed_text(params["a"], batch["text_ids"], batch["text_mask"])[0]
    i2t, t2i = gathered_similarity_logits(mesh, img, txt, a.temperature(params["a"]))
    itc, parts = contrastive_loss(i2t, t2i, jnp.arange(img.shape[0]))
    target = teacher.embed_images(frozen["teacher"], batch["image"])
    mse = jnp.mean((head.apply({"params": params["b"]}, img) - target) ** 2)
    return itc + mse, dict(parts, mse=mse), extra

  return Recipe(
      name="two_modules",
      modules={"a": Module(model, lambda k: init_params(model, config.model, k)),
               "b": Module(head, lambda k: head.init(k, jnp.zeros((1, E)))["params"])},
      loss_fn=loss_fn, frozen={"teacher": teacher.params})


def _config():
  c = recipe_config("dual", "tiny")
  c.model.vocab_size, c.model.max_len = 40, L
  c.optim.warmup_steps = 0
  c.trainable = (("b/.*", None), ("a/.*", {"learning_rate": LR_A, "weight_decay": 0.0}))
  return c


def _batches(n):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    ids = rng.integers(5, 40, (B, L)).astype(np.int32)
    out.append({"image": rng.normal(size=(B, 56, 56, 1)).astype(np.float32), "text_ids": ids,
                "text_mask": np.ones((B, L), np.int32)})
  return out


def _train(devices, steps):
  config = _config()
  mesh = make_mesh(devices=jax.devices()[:devices])
  recipe = _recipe(config, mesh)
  batches = _batches(steps)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
  built = build_state(recipe, config, mesh, spec)
  step = make_train_step(recipe.loss_fn, built["tx"], {}, built["trainable"], built["shardings"])
  frozen = jax.device_put(recipe.frozen, built["shardings"]["frozen"])
  state = initial = jax.device_get(built["init"]())
  state = built["init"]()
  losses = []
  for b in batches:
    placed = {k: jax.device_put(v, built["shardings"]["batch"][k]) for k, v in b.items()}
    state, metrics = step(state, placed, frozen)
    losses.append(float(metrics["loss"]))
  return recipe, initial, jax.device_get(state), losses, frozen


@pytest.fixture(scope="module")
def eight():
  return _train(8, 10)


def test_frozen_module_is_bit_identical_and_a_trains_at_its_learning_rate(eight):
  recipe, initial, state, losses, _ = eight
  jax.tree.map(np.testing.assert_array_equal, state.params["b"], initial.params["b"])
  assert np.all(np.isfinite(losses))
  # Adam's first update is lr * g / (|g| + eps): |delta| = LR_A wherever the gradient is not ~0.
  one = _train(8, 1)[2]
  moved = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in zip(
      jax.tree.leaves(one.params["a"]), jax.tree.leaves(initial.params["a"]))])
  np.testing.assert_allclose(np.max(moved), LR_A, rtol=1e-3)
  assert np.median(moved) > 0.5 * LR_A
  # Frozen params have no optimiser state (optax.set_to_zero keeps none).
  sizes = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert sizes == 2 * sum(x.size for x in jax.tree.leaves(state.params["a"])) + 2


def test_teacher_receives_no_gradient(eight):
  recipe, initial, _, _, frozen = eight
  batch = _batches(1)[0]
  grads = jax.grad(lambda f: recipe.loss_fn(initial.params, f, {}, batch, None, 0)[0])(
      jax.device_get(frozen))
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def _stepper(devices):
  """(step(host state, batch) -> (host state, loss), initial host state) on `devices` devices."""
  config = _config()
  mesh = make_mesh(devices=jax.devices()[:devices])
  recipe = _recipe(config, mesh)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batches(1)[0].items()}
  built = build_state(recipe, config, mesh, spec)
  step = make_train_step(recipe.loss_fn, built["tx"], {}, built["trainable"], built["shardings"])
  frozen = jax.device_put(recipe.frozen, built["shardings"]["frozen"])

  def run(state, batch):
    state = jax.device_put(state, built["shardings"]["state"])
    placed = {k: jax.device_put(v, built["shardings"]["batch"][k]) for k, v in batch.items()}
    state, metrics = step(state, placed, frozen)
    return jax.device_get(state), float(metrics["loss"])
  return run, jax.device_get(built["init"]())


def _grads(devices, params):
  """Gradients of the loss at `params` on the first batch, jitted on a `devices`-device mesh."""
  config = _config()
  mesh = make_mesh(devices=jax.devices()[:devices])
  recipe = _recipe(config, mesh)
  batch = _batches(1)[0]
  return jax.device_get(jax.jit(jax.grad(
      lambda p: recipe.loss_fn(p, recipe.frozen, {}, batch, None, 0)[0]))(params))


def test_eight_devices_equal_one_device(eight):
  """Every one of 10 steps taken from the same state (the 1-device trajectory) gives the same
  loss on 8 devices, and the gradients at the first and the last state agree, to 1e-5 (relative,
  or of the largest gradient entry for entries that are rounding noise). (Params
  after an Adam step are not compared: an entry whose gradient is rounding noise moves by up to
  the learning rate in a noise-chosen direction.)"""
  step8, _ = _stepper(8)
  step1, state = _stepper(1)
  first = state.params
  for batch in _batches(10):
    _, loss8 = step8(state, batch)
    state, loss1 = step1(state, batch)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for params in (first, state.params):
    g8, g1 = _grads(8, params), _grads(1, params)
    scale = max(np.abs(x).max() for x in jax.tree.leaves(g1))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * scale),
                 g8, g1)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_dropout_follows_the_step_key(rate):
  """model.dropout_rate > 0: the recipe's loss changes with the step's key (dropout is on in
  training) and evaluation stays deterministic; 0: the key changes nothing."""
  from jaxdistill.methods import dual
  config = _config()
  config.model.dropout_rate = rate
  config.dual = recipe_config("dual", "tiny").dual
  mesh = make_mesh()
  recipe = dual.build(config, mesh, None, 1)
  params = {"student": recipe.modules["student"].init(jax.random.PRNGKey(0))}
  batch = _batches(1)[0]
  loss = jax.jit(lambda rng: recipe.loss_fn(params, {}, {}, batch, rng, 0)[0])
  a, b = float(loss(jax.random.PRNGKey(1))), float(loss(jax.random.PRNGKey(2)))
  assert (a != b) if rate > 0 else (a == b)
  t = towers(recipe.modules["student"].model)
  emb = jax.jit(lambda: t.embed_image(params["student"], batch["image"])[0])
  np.testing.assert_array_equal(emb(), emb())
