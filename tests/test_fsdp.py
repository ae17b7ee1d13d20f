"""Sharded params (mesh.fsdp > 1) inside the real train step: every param and optimiser-state
leaf above config.sharding.min_fsdp_size is split over the fsdp axis, the losses equal the
data-parallel run's, XLA's per-device argument bytes for the state drop, and a checkpoint
saved on one mesh restores onto others and continues with the same losses."""

import jax
import numpy as np
import pytest

from conftest import recipe_config
from jaxdistill import methods
from jaxdistill.data import pipeline
from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.parallel.sharding import path_str
from jaxdistill.store.checkpoint import Checkpointer, abstract_like
from jaxdistill.train.loop import build_state

STEPS = 3


def _config():
  """The dual recipe at the cpu preset's widths (tiny widths have no leaf above the threshold)."""
  c = recipe_config("dual", "tiny")
  cpu = recipe_config("dual", "cpu").model
  for key in ("vision_width", "vision_layers", "vision_heads", "vision_mlp", "text_width",
              "text_layers", "text_heads", "text_mlp", "embed_dim"):
    c.model[key] = cpu[key]
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = _config()
  bench = prepare_benchmark(config, str(tmp_path_factory.mktemp("fsdp")))
  config.model.vocab_size = bench.vocab_size
  data = pipeline.train_dataset(bench.splits["train"], *bench.tokens["train"],
                                global_batch_size=config.batch_size,
                                group_size=config.data.group_size, seed=0)
  it = iter(data)
  batches = [next(it) for _ in range(2 * STEPS)]
  return config, bench, batches


def _trainer(setup, data, fsdp):
  config, bench, batches = setup
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp = data, fsdp
  mesh = make_mesh(data, fsdp)
  recipe = methods.build(config, mesh, bench, 10)
  built = build_state(recipe, config, mesh, pipeline.global_batch_spec(batches[0]))
  return config, built, built["step"], recipe


def _run(step, built, state, batches, frozen=None):
  losses = []
  for b in batches:
    state, metrics = step(state, pipeline.to_global_batch(b, built["shardings"]["batch"]),
                          frozen or {})
    losses.append(float(metrics["loss"]))
  return state, losses


def test_fsdp_splits_every_large_leaf_and_keeps_the_losses(setup):
  _, _, batches = setup
  config, dp, dp_step, _ = _trainer(setup, 8, 1)
  _, fs, fs_step, _ = _trainer(setup, 1, 8)
  dp_state, dp_losses = _run(dp_step, dp, dp["init"](), batches[:STEPS])
  fs_state, fs_losses = _run(fs_step, fs, fs["init"](), batches[:STEPS])
  np.testing.assert_allclose(fs_losses, dp_losses, rtol=1e-5)
  # Params agree to Adam's resolution: a gradient entry that is rounding noise (~1e-9) in both
  # runs still moves its param by up to lr (~1e-5 in the warm-up) in a noise-chosen direction.
  # Attention key biases are skipped: softmax is invariant to adding q.b_k to every score of a
  # query, so their gradient is exactly zero in real arithmetic and pure rounding noise here,
  # which Adam normalises into full-size steps of either sign (CI saw 1.4e-4 vs -1.4e-4).
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(fs_state.params)),
                          jax.tree.leaves(jax.device_get(dp_state.params))):
    if path_str(path).endswith("key/bias"):
      continue
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-4, err_msg=path_str(path))

  # Every param and optimiser-state leaf above the threshold is split 8 ways (live arrays).
  threshold = config.sharding.min_fsdp_size
  big = 0
  for tree in (fs_state.params, fs_state.opt_state):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      shards = leaf.size // int(np.prod(leaf.sharding.shard_shape(leaf.shape)))
      if leaf.size >= threshold:
        big += 1
        assert shards == 8, f"{path_str(path)} {leaf.shape}: {shards} shards"
      else:
        assert shards == 1, f"{path_str(path)} {leaf.shape} is below the threshold but split"
  assert big >= 20

  # XLA's per-device argument bytes for the state drop at least 6x.
  def argument_bytes(built):
    copy = jax.jit(lambda s: jax.tree.map(lambda x: x + 0, s),
                   in_shardings=(built["shardings"]["state"],))
    return copy.lower(built["abstract"]).compile().memory_analysis().argument_size_in_bytes
  dp_bytes, fs_bytes = argument_bytes(dp), argument_bytes(fs)
  assert dp_bytes / fs_bytes >= 6, (dp_bytes, fs_bytes)


@pytest.mark.parametrize("data,fsdp", [(1, 8), pytest.param(2, 4, marks=pytest.mark.exhaustive)])
def test_checkpoint_from_data_parallel_restores_onto_fsdp(setup, tmp_path, data, fsdp):
  _, _, batches = setup
  _, dp, dp_step, _ = _trainer(setup, 8, 1)
  state, _ = _run(dp_step, dp, dp["init"](), batches[:STEPS])
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(STEPS, state, {"step": STEPS}, wait=True)
  _, want = _run(dp_step, dp, state, batches[STEPS:])

  _, other, other_step, _ = _trainer(setup, data, fsdp)
  restored, _ = checkpointer.restore(abstract_like(other["abstract"], other["shardings"]["state"]))
  checkpointer.close()
  assert int(restored.step) == STEPS
  _, got = _run(other_step, other, restored, batches[STEPS:])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_teacher_shard_flag_decides_its_placement():
  """config.teachers.<name>.shard: True -> its large params split over fsdp like the state's,
  False -> replicated (config.sharding_rules puts a "replicated" rule first)."""
  from jaxdistill.config import sharding_rules, teacher_section
  from jaxdistill.parallel.sharding import tree_shardings
  config = _config()
  config.teachers.big = teacher_section("workdir", "unused")
  config.teachers.small = teacher_section("workdir", "unused")
  config.teachers.big.shard = True
  frozen = {name: {"w": jax.ShapeDtypeStruct((256, 128), np.float32)} for name in ("big", "small")}
  placed = tree_shardings(frozen, make_mesh(1, 8), sharding_rules(config),
                          config.sharding.min_fsdp_size, prefix="frozen")
  assert placed["big"]["w"].shard_shape((256, 128)) == (32, 128)
  assert placed["small"]["w"].shard_shape((256, 128)) == (256, 128)
