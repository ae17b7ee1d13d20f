"""Sharding rules as data (parallel/sharding.py) on 8 simulated CPU devices: which leaves split,
along which dim, on which meshes; first-match order; explicit specs; every error; a jitted AdamW
step with these shardings equals the unsharded one."""

import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from jaxdistill.errors import JaxDistillError
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.parallel.sharding import (DEFAULT_MIN_FSDP_SIZE, DEFAULT_RULES, ShardingError,
                                          describe, leaf_spec, path_str, shard_fraction,
                                          tree_shardings)

MIN = 256           # tests use a small threshold so the arrays stay tiny
CATCH_ALL = ((".*", "fsdp"),)


def _params():
  """Shapes chosen so each mesh exercises one branch of the "fsdp" choice."""
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"student": {
      "dual": {"image_projection": {"kernel": f(16, 40), "bias": f(40)},   # 640: dim 1 largest
               "embedding": f(48, 16),                                  # 768: dim 0 largest
               "square": f(24, 24),                                     # tie -> dim 0
               "odd": f(30, 16)},                                       # 30 % 4, 8 != 0 -> dim 1
      "temperature": f()}}


# expected shard shape per param path, per fsdp size (1: everything whole)
SHARD = {
    8: {"student/dual/image_projection/kernel": (16, 5),
        "student/dual/image_projection/bias": (40,),
        "student/dual/embedding": (6, 16), "student/dual/square": (3, 24),
        "student/dual/odd": (30, 2), "student/temperature": ()},
    4: {"student/dual/image_projection/kernel": (16, 10),
        "student/dual/image_projection/bias": (40,),
        "student/dual/embedding": (12, 16), "student/dual/square": (6, 24),
        "student/dual/odd": (30, 4), "student/temperature": ()},
}


def _by_path(tree):
  return {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_path_str_on_dicts_optax_states_and_struct_dataclasses():
  params = _params()
  keys = (DictKey("a"), GetAttrKey("mu"), SequenceKey(1), FlattenedIndexKey(3))
  assert path_str(keys) == "a/mu/1/3"
  assert path_str(()) == ""
  adamw = _by_path(optax.adamw(1e-3).init(params))
  assert {"0/count", "0/mu/student/dual/odd", "0/nu/student/temperature"} <= set(adamw)
  # trainer-style: clip + adamw(schedule, mask) in a chain
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.linear_schedule(0.0, 1e-3, 10),
                               mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  chained = _by_path(tx.init(params))
  assert {"1/0/count", "1/0/mu/student/dual/image_projection/kernel", "1/2/count"} <= set(chained)
  multi = _by_path(optax.multi_transform(
      {"a": optax.adamw(1e-3), "b": optax.set_to_zero()},
      {"student": {"dual": "a", "temperature": "b"}}).init(params))
  assert "inner_states/a/inner_state/0/mu/student/dual/square" in multi
  assert not any("temperature" in p for p in multi)   # masked out leaves are empty nodes

  @flax.struct.dataclass
  class State:
    step: jax.Array
    params: dict

  assert set(_by_path(State(jnp.zeros(()), {"w": jnp.zeros(2)}))) == {"step", "params/w"}


@pytest.mark.parametrize("data, fsdp", [(8, 1), (1, 8), (2, 4)])
def test_fsdp_splits_big_leaves_of_params_and_adamw_state(data, fsdp):
  mesh = make_mesh(data, fsdp)
  params = _params()
  opt_state = optax.adamw(1e-3).init(params)
  tree = {"params": params, "opt_state": opt_state}
  placed = jax.device_put(tree, tree_shardings(tree, mesh, CATCH_ALL, MIN))
  leaves = _by_path(placed)
  assert leaves["opt_state/0/count"].sharding.shard_shape(()) == ()
  for path, x in leaves.items():
    if path == "opt_state/0/count":
      continue
    param_path = re.sub(r"^(params|opt_state/0/(mu|nu))/", "", path)
    expected = x.shape if fsdp == 1 else SHARD[fsdp][param_path]
    assert x.sharding.shard_shape(x.shape) == expected, path
    assert {s.data.shape for s in x.addressable_shards} == {expected}, path
    assert shard_fraction(x) == pytest.approx(np.prod(expected) / max(np.prod(x.shape), 1)), path
    np.testing.assert_array_equal(x, _by_path(tree)[path])


def test_min_fsdp_size_and_default_threshold():
  mesh = make_mesh(1, 8)
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {"big": sds(128, 128), "small": sds(127, 128), "vec": sds(2**14)}
  got = tree_shardings(tree, mesh, CATCH_ALL, DEFAULT_MIN_FSDP_SIZE)
  assert DEFAULT_MIN_FSDP_SIZE == 2**14
  assert got["big"].spec == P("fsdp") and got["vec"].spec == P("fsdp")
  assert got["small"].spec == P()
  assert tree_shardings(tree, mesh, CATCH_ALL, 0)["small"].spec == P(None, "fsdp")


def test_first_matching_rule_wins_and_prefix_names_the_leaves():
  mesh = make_mesh(2, 4)
  params = _params()
  rules = ((r"params/student/dual/embedding", "replicated"), (r"params/.*", "fsdp"))
  got = _by_path(tree_shardings(params, mesh, rules, MIN, prefix="params"))
  assert got["student/dual/embedding"].spec == P()
  assert got["student/dual/square"].spec == P("fsdp")
  got = _by_path(tree_shardings(params, mesh, rules[::-1], MIN, prefix="params/"))
  assert got["student/dual/embedding"].spec == P("fsdp")
  # one rule covers a param, its AdamW moments and its EMA copy
  state = {"params": params, "ema_params": params, "opt_state": optax.adamw(1e-3).init(params)}
  got = _by_path(tree_shardings(state, mesh, ((r".*/student/dual/embedding", "replicated"),
                                              (r".*", "fsdp")), MIN))
  assert {p for p, s in got.items() if p.endswith("embedding")} == {
      "params/student/dual/embedding", "ema_params/student/dual/embedding",
      "opt_state/0/mu/student/dual/embedding", "opt_state/0/nu/student/dual/embedding"}
  assert all(s.spec == P() for p, s in got.items() if p.endswith("embedding"))
  assert got["opt_state/0/nu/student/dual/square"].spec == P("fsdp")
  # a single array: its path is the prefix
  assert tree_shardings(jnp.zeros((8, 8)), mesh, (("w", (None, "fsdp")),), prefix="w").spec == \
      P(None, "fsdp")


@pytest.mark.parametrize("spec, shard_shape", [
    ((None, "fsdp"), (16, 10)), (("data", "fsdp"), (8, 10)), ((("data", "fsdp"),), (2, 40)),
    (("fsdp",), (4, 40)), ([None, ["fsdp", "data"]], (16, 5)), (P("data"), (8, 40)),
    ((), (16, 40)), ("replicated", (16, 40)), ("batch", (2, 40))])
def test_explicit_specs(spec, shard_shape):
  mesh = make_mesh(2, 4)
  x = jnp.arange(16 * 40, dtype=jnp.float32).reshape(16, 40)
  sh = tree_shardings({"w": x}, mesh, (("w", spec),))["w"]
  y = jax.device_put(x, sh)
  assert y.sharding.shard_shape(y.shape) == shard_shape
  np.testing.assert_array_equal(y, x)


def test_scalars_are_always_replicated():
  mesh = make_mesh(2, 4)
  for spec in ("fsdp", "batch", ("fsdp",), (None, None, "data")):
    assert tree_shardings({"s": jnp.zeros(())}, mesh, (("s", spec),), 0)["s"].spec == P()
  assert tree_shardings({"n": 3}, mesh, CATCH_ALL, 0)["n"].spec == P()


def test_default_rules_batch_and_extra():
  mesh = make_mesh(2, 4)
  batch = {"image": jnp.zeros((16, 4, 4)), "ids": jnp.zeros((16,), jnp.int32)}
  got = tree_shardings(batch, mesh, DEFAULT_RULES, prefix="batch")
  assert got["image"].spec == P(("data", "fsdp")) and got["ids"].spec == P(("data", "fsdp"))
  assert tree_shardings(jnp.zeros((16, 3)), mesh, DEFAULT_RULES, prefix="batch").spec == \
      P(("data", "fsdp"))                    # a bare array named by the prefix alone
  state = {"extra": {"values": jnp.zeros((2**12, 8))},
           "params": {"w": jnp.zeros((2**12, 8))}}
  got = tree_shardings(state, mesh, DEFAULT_RULES)
  assert got["extra"]["values"].spec == P() and got["params"]["w"].spec == P("fsdp")


def _raises(match, fn):
  with pytest.raises(ShardingError, match=match) as info:
    fn()
  assert isinstance(info.value, JaxDistillError)
  return str(info.value)


def test_unmatched_leaf_names_path_and_fix():
  mesh = make_mesh(2, 4)
  msg = _raises("no rule matches", lambda: tree_shardings(
      {"student": {"w": jnp.zeros((4,))}}, mesh, (("params/other/.*", "fsdp"),), prefix="params"))
  assert "'params/student/w'" in msg and "add a rule for it to config.sharding" in msg
  # scalars need a rule too: every leaf is decided here
  _raises("'opt_state/0/count'", lambda: tree_shardings(
      optax.adamw(1e-3).init({"w": jnp.zeros(4)}), mesh, (("opt_state/.*/mu/.*", "fsdp"),),
      prefix="opt_state"))


@pytest.mark.parametrize("spec, shape, why", [
    (("fsdp",), (30, 8), "dim 0 of size 30 is not divisible by fsdp = 4"),
    ((None, ("data", "fsdp")), (8, 12), "dim 1 of size 12 is not divisible by data\\*fsdp = 8"),
    ("batch", (6, 8), "dim 0 of size 6 is not divisible by data\\*fsdp = 8"),
    (("model",), (8, 8), "the mesh has no axis 'model'"),
    ((None, None, "fsdp"), (8, 8), "the spec has 3 entries but the leaf has 2 dims"),
    (("fsdp", "fsdp"), (8, 8), "axis 'fsdp' is used twice"),
])
def test_spec_that_does_not_fit_names_path_shape_spec_and_mesh(spec, shape, why):
  mesh = make_mesh(2, 4)
  msg = _raises(why, lambda: tree_shardings(
      {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}, mesh, (("params/w", spec),),
      prefix="params"))
  for part in ("'params/w'", str(shape), repr(spec), "{'data': 2, 'fsdp': 4}", "config.sharding"):
    assert part in msg, (part, msg)


@pytest.mark.parametrize("rules, why", [
    (((".*", "fdsp"),), "spec 'fdsp' is not one of"),
    ((("(", "fsdp"),), "bad regex"),
    (((".*", (None, 3)),), "spec must be"),
    ((".*",), "is not a \\(regex, spec\\) pair"),
    (".*", "must be a sequence of \\(regex, spec\\) pairs"),
])
def test_malformed_rules(rules, why):
  msg = _raises(why, lambda: tree_shardings({"w": jnp.zeros(4)}, make_mesh(2, 4), rules))
  assert "config.sharding" in msg


@pytest.mark.parametrize("data, fsdp", [(1, 8), (2, 4)])
def test_jitted_adamw_step_with_rule_shardings_equals_unsharded(data, fsdp):
  mesh = make_mesh(data, fsdp)
  params = _params()
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  rng = np.random.default_rng(1)
  batch = {"x": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)}

  def step(params, opt_state, batch):
    def loss_fn(p):
      d = p["student"]["dual"]
      h = batch["x"] @ d["image_projection"]["kernel"] + d["image_projection"]["bias"]
      h = h + (d["embedding"][:16] @ d["odd"][:16, :16].T).sum() * 1e-3 + d["square"].mean()
      return jnp.mean((h * p["student"]["temperature"] - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state_sh = tree_shardings({"params": params, "opt_state": opt_state}, mesh, DEFAULT_RULES, MIN)
  batch_sh = tree_shardings(batch, mesh, DEFAULT_RULES, prefix="batch")
  rep = NamedSharding(mesh, P())
  sharded = jax.jit(step, in_shardings=(state_sh["params"], state_sh["opt_state"], batch_sh),
                    out_shardings=(state_sh["params"], state_sh["opt_state"], rep))
  placed = jax.device_put((params, opt_state, batch),
                          (state_sh["params"], state_sh["opt_state"], batch_sh))
  want = step(params, opt_state, batch)
  got = sharded(*placed)
  got = sharded(got[0], got[1], placed[2])        # a second step takes its own outputs back
  want = step(want[0], want[1], batch)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
  assert got[0]["student"]["dual"]["square"].sharding.shard_shape((24, 24)) == (24 // fsdp, 24)
  assert shard_fraction(got[1][0].mu["student"]["dual"]["embedding"]) == 1 / fsdp


def test_leaf_spec_matches_tree_shardings():
  mesh = make_mesh(1, 8)
  assert leaf_spec("params/w", (16, 40), mesh, CATCH_ALL, MIN) == P(None, "fsdp")
  assert leaf_spec("params/b", (40,), mesh, CATCH_ALL, MIN) == P()


def test_shard_fraction_and_describe():
  mesh = make_mesh(2, 4)
  params = _params()
  placed = jax.device_put(params, tree_shardings(params, mesh, CATCH_ALL, MIN))
  assert shard_fraction(placed["student"]["dual"]["square"]) == 0.25
  assert shard_fraction(placed["student"]["temperature"]) == 1.0
  batch = jax.device_put(jnp.zeros((16, 2)), tree_shardings(jnp.zeros((16, 2)), mesh,
                                                            (("batch", "batch"),), prefix="batch"))
  assert shard_fraction(batch) == 0.125
  total = sum(x.size * 4 for x in jax.tree.leaves(params))           # 2,880 + 41 floats
  per_device = (640 + 768 + 576 + 480) // 4 * 4 + (40 + 1) * 4
  line = describe(placed, name="params")
  assert line == (f"params: {per_device / 1000:.1f} KB/device of {total / 1000:.1f} KB, "
                  "4 of 6 leaves split over fsdp"), line
  # the same from abstract shapes + shardings, before anything is allocated
  shapes = jax.eval_shape(lambda: params)
  assert describe(shapes, tree_shardings(shapes, mesh, CATCH_ALL, MIN), "params") == line
  assert describe({"a": np.zeros(3, np.float32)}) == \
      "state: 12 B/device of 12 B, 0 of 1 leaves split"
