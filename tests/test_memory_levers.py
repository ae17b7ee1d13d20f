"""Memory levers of the student (config.model.remat, config.model.dtype; docs/architecture.md
"Memory levers"):

- remat (none | full | dots) wraps each transformer block in nn.remat and changes neither the
  params tree nor the loss and gradients (to 1e-5; in practice they are bit-identical);
- bfloat16 compute keeps params, gradients and optimiser state float32, and a 20-step tiny
  training curve of the dual recipe stays within CURVE_TOL of the float32 one (remat on or off);
- the compiled train step's XLA temporaries (memory_analysis, deterministic) drop with remat on.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_pairs, recipe_config
from jaxdistill.config import MODEL_DTYPES, REMAT_POLICIES, ConfigError, validate
from jaxdistill.data.tokenizer import SpecialIds
from jaxdistill.methods import dual as dual_method
from jaxdistill.methods import loopitr as loopitr_method
from jaxdistill.methods.base import STUDENT
from jaxdistill.models.build import build_model, init_params
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.train.loop import build_state
from jaxdistill.train.step import CPU_COMPILER_OPTIONS, make_train_step

B, L, STEPS = 16, 12, 20
REMAT_TOL = 1e-5     # remat vs none: loss and every gradient entry (relative to max(1, max |g|))
CURVE_TOL = 0.05     # bfloat16 compute vs float32: max |loss difference| over 20 steps (losses
                     # ~3-4; measured 0.013 without remat and 0.017 with it, docs/benchmarks.md)
METHODS = {"dual": dual_method, "loopitr": loopitr_method}
BENCH = types.SimpleNamespace(special_ids=SpecialIds())


def _config(name, remat="none", dtype="float32"):
  c = recipe_config(name, "tiny")
  c.model.vocab_size, c.model.max_len = 40, L
  c.batch_size, c.train.num_steps = B, STEPS
  c.model.remat, c.model.dtype = remat, dtype
  return c


def _batch(seed):
  rows = random_pairs(np.random.default_rng(seed), B, L, min_len=6, bracket=True)
  return dict(rows, image_id=np.arange(B, dtype=np.int32))


def _mesh():
  return make_mesh(devices=jax.devices()[:1])


def _paths(tree):
  return {jax.tree_util.keystr(p): (x.shape, x.dtype) for p, x in
          jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("kind", ["dual", "loopitr"])
def test_params_tree_is_the_same_under_every_lever(kind):
  """Checkpoints and init_from mappings load whatever the levers: the same param names, shapes
  and float32 dtype, and the same values from one key."""
  def params(remat, dtype, abstract=True):
    mc = _config(kind, remat, dtype).model
    model = build_model(mc)
    init = lambda k: init_params(model, mc, k)
    return (jax.eval_shape if abstract else lambda f, k: jax.jit(f)(k))(init,
                                                                       jax.random.PRNGKey(0))

  base = params("none", "float32")
  assert {d for _, d in _paths(base).values()} == {jnp.dtype(jnp.float32)}
  for remat in REMAT_POLICIES:
    for dtype in MODEL_DTYPES:
      assert _paths(params(remat, dtype)) == _paths(base), (remat, dtype)
  jax.tree.map(np.testing.assert_array_equal, params("full", "bfloat16", abstract=False),
               params("none", "float32", abstract=False))


def _loss_and_grads(name, remat):
  """(loss, grads, compiled HLO text) of the recipe's loss_fn on one batch, jitted as the
  train step compiles (CPU_COMPILER_OPTIONS keep remat's optimization barriers on XLA:CPU)."""
  config = _config(name, remat)
  recipe = METHODS[name].build(config, _mesh(), BENCH, 10)
  params = {STUDENT: recipe.modules[STUDENT].init(jax.random.PRNGKey(0))}
  extra = recipe.init_extra() if recipe.init_extra is not None else {}
  rng, step = jax.random.PRNGKey(3), jnp.asarray(0, jnp.int32)

  def value_and_grad(p, b):
    return jax.value_and_grad(
        lambda q: recipe.loss_fn(q, recipe.frozen, extra, b, rng, step)[0])(p)

  batch = _batch(0)
  compiled = jax.jit(value_and_grad, compiler_options=CPU_COMPILER_OPTIONS).lower(
      params, batch).compile()
  loss, grads = jax.device_get(compiled(params, batch))
  return loss, grads, compiled.as_text()


@pytest.mark.parametrize("name,policies", [("dual", ("full", "dots")), ("loopitr", ("full",))])
def test_remat_gives_the_same_loss_and_gradients(name, policies):
  loss, grads, hlo = _loss_and_grads(name, "none")
  for remat in policies:
    r_loss, r_grads, r_hlo = _loss_and_grads(name, remat)
    # the backward pass really recomputes: more matmuls in the compiled program
    assert r_hlo.count(" dot(") > hlo.count(" dot("), remat
    worst = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.abs(a - b).max() / max(1.0, np.abs(b).max())), r_grads, grads)))
    print(f"\n{name} remat={remat}: |loss diff| {abs(r_loss - loss):.3g}, max grad diff {worst:.3g}")
    np.testing.assert_allclose(r_loss, loss, rtol=REMAT_TOL, atol=REMAT_TOL)
    assert worst <= REMAT_TOL


def _curve(remat, dtype):
  """Per-step losses of STEPS train steps of the tiny dual recipe (the trainer's build_state +
  make_train_step, AdamW) on fixed batches, and the final state."""
  config, mesh = _config("dual", remat, dtype), _mesh()
  recipe = dual_method.build(config, mesh, None, 1)
  batches = [_batch(s) for s in range(STEPS)]
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
  built = build_state(recipe, config, mesh, spec)
  state = built["init"]()
  step = make_train_step(recipe.loss_fn, built["tx"], {}, built["trainable"], built["shardings"])
  losses = []
  for b in batches:
    state, metrics = step(state, jax.device_put(b, built["shardings"]["batch"]), {})
    losses.append(float(metrics["loss"]))
  return np.asarray(losses), state


def test_remat_and_bfloat16_training_curves():
  base, _ = _curve("none", "float32")
  assert np.all(np.isfinite(base)) and base[-5:].mean() < base[:5].mean()   # it learns
  for remat, dtype in (("full", "float32"), ("none", "bfloat16"), ("full", "bfloat16")):
    losses, state = _curve(remat, dtype)
    diff = float(np.abs(losses - base).max())
    print(f"\nremat={remat} dtype={dtype}: max |loss diff| over {STEPS} steps {diff:.3g}")
    assert diff <= (REMAT_TOL if dtype == "float32" else CURVE_TOL), (remat, dtype, diff)
    # params, optimiser state (and so gradients) stay float32 in bfloat16 compute
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)


def _temp_bytes(remat):
  """XLA temporaries of the compiled dual train step of a student with 197 tokens per image
  (112 px, 8 px patches, 4 layers; a 1-layer text tower) at batch 8, on abstract shapes (nothing runs)."""
  config = _config("dual", remat)
  m = config.model
  m.image_size, m.patch_size, m.stem, m.image_pool = 112, 8, "linear", "cls"
  m.vision_layers, m.text_layers = 4, 1
  config.batch_size = 8
  mesh = _mesh()
  recipe = dual_method.build(config, mesh, None, 1)
  spec = {"image": jax.ShapeDtypeStruct((8, 112, 112, 1), jnp.float32),
          "text_ids": jax.ShapeDtypeStruct((8, L), jnp.int32),
          "text_mask": jax.ShapeDtypeStruct((8, L), jnp.int32),
          "image_id": jax.ShapeDtypeStruct((8,), jnp.int32)}
  built = build_state(recipe, config, mesh, spec)
  step = make_train_step(recipe.loss_fn, built["tx"], {}, built["trainable"], built["shardings"])
  return step.lower(built["abstract"], spec, {}).compile().memory_analysis().temp_size_in_bytes


def test_remat_lowers_the_compiled_steps_temporary_memory():
  temp = {remat: _temp_bytes(remat) for remat in REMAT_POLICIES}
  print(f"\ntemp bytes: {temp}")
  assert temp["full"] < 0.5 * temp["none"]     # measured 11.2 MB vs 36.7 MB (dots 12.7 MB)
  assert temp["dots"] < temp["none"]


def test_config_errors_name_the_key():
  for key, value in (("remat", "partial"), ("dtype", "float16")):
    config = _config("dual")
    config.model[key] = value
    with pytest.raises(ConfigError,
                       match=rf"--config\.model\.{key}='{value}' is not valid: use one of"):
      validate(config, 8)
