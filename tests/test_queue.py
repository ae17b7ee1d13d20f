"""The ring-buffer feature queue (parallel/queue.py): wrap-around, sizes that are not a multiple
of the batch, id masking, 8-device enqueue order equal to 1-device, orbax save / restore."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdistill.parallel import queue as q
from jaxdistill.parallel.mesh import batch_sharding, make_mesh, replicated


def _specs(dim=2):
  return {"feat": jax.ShapeDtypeStruct((dim,), jnp.float32),
          "index": jax.ShapeDtypeStruct((), jnp.int32)}


def _batch(start, b, dim=2):
  ids = np.arange(start, start + b, dtype=np.int32)
  return {"feat": np.stack([ids, -ids], 1).astype(np.float32)[:, :dim], "index": ids * 10}, ids


def _reference(size, batches):
  """The queue as a python list of the last `size` ids, slot = write number mod size."""
  slots = [-1] * size
  written = 0
  for ids in batches:
    for i in ids:
      slots[written % size] = int(i)
      written += 1
  return slots, written % size, min(written, size)


@pytest.mark.parametrize("size,b,steps", [(8, 4, 5), (7, 3, 4), (5, 4, 3), (3, 8, 2)])
def test_wrap_around_and_sizes_not_multiple_of_batch(size, b, steps):
  queue = q.create_queue(size, _specs())
  enqueue = jax.jit(q.enqueue)
  batches = []
  for s in range(steps):
    keys, ids = _batch(100 * s, b)
    batches.append(ids)
    queue = enqueue(queue, keys, ids)
  slots, ptr, count = _reference(size, batches)
  np.testing.assert_array_equal(queue.ids, slots)
  np.testing.assert_array_equal(queue.values["index"], np.asarray(slots) * 10 * (np.asarray(slots) >= 0))
  np.testing.assert_array_equal(queue.values["feat"][:, 0], np.maximum(slots, 0))
  assert int(queue.ptr) == ptr and int(queue.count) == count
  np.testing.assert_array_equal(q.valid_mask(queue), np.arange(size) < count)
  # age 0 = the last key written
  assert int(queue.ids[int(jnp.argmin(q.age(queue)))]) == int(batches[-1][-1])


def test_validity_while_filling():
  queue = q.create_queue(10, _specs())
  assert not np.any(q.valid_mask(queue))
  keys, ids = _batch(0, 4)
  queue = q.enqueue(queue, keys, ids)
  np.testing.assert_array_equal(q.valid_mask(queue), [1] * 4 + [0] * 6)


def test_negative_mask_drops_duplicates_of_the_positive_and_empty_slots():
  queue = q.create_queue(6, _specs())
  keys, ids = _batch(0, 4)
  queue = q.enqueue(queue, keys, ids)                    # ids 0, 1, 2, 3 in slots 0-3
  mask = q.negative_mask(jnp.asarray([1, 7]), queue.ids, q.valid_mask(queue))
  np.testing.assert_array_equal(mask, [[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])


def test_enqueue_errors_name_the_mismatch():
  queue = q.create_queue(4, _specs())
  with pytest.raises(ValueError, match="per entry"):
    q.enqueue(queue, {"feat": jnp.zeros((2, 3)), "index": jnp.zeros(2, jnp.int32)}, jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="queue size"):
    q.create_queue(0, _specs())


def _run_sharded(mesh, size, batches):
  rep = replicated(mesh)
  queue = jax.device_put(q.create_queue(size, _specs(4)), rep)
  shardings = jax.tree.map(lambda _: rep, queue)
  step = jax.jit(q.enqueue, in_shardings=(shardings, batch_sharding(mesh), batch_sharding(mesh)),
                 out_shardings=shardings)
  for keys, ids in batches:
    queue = step(queue, keys, ids)
  return jax.device_get(queue)


def test_eight_device_enqueue_order_equals_one_device():
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  batches = [({"feat": rng.normal(size=(8, 4)).astype(np.float32),
               "index": rng.integers(0, 99, 8).astype(np.int32)},
              np.arange(8 * s, 8 * s + 8, dtype=np.int32)) for s in range(4)]
  eight = _run_sharded(make_mesh(devices=jax.devices()), 13, batches)
  one = _run_sharded(make_mesh(devices=jax.devices()[:1]), 13, batches)
  for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one)):
    np.testing.assert_array_equal(a, b)
  slots, _, _ = _reference(13, [ids for _, ids in batches])
  np.testing.assert_array_equal(eight.ids, slots)


def test_restore_from_orbax_checkpoint(tmp_path):
  queue = q.create_queue(5, _specs())
  for s in range(3):
    queue = q.enqueue(queue, *_batch(10 * s, 2))
  manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
  manager.save(1, args=ocp.args.StandardSave(queue))
  manager.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), q.create_queue(5, _specs()))
  restored = manager.restore(1, args=ocp.args.StandardRestore(abstract))
  manager.close()
  assert isinstance(restored, q.FeatureQueue)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(queue)):
    np.testing.assert_array_equal(a, b)
  # the restored queue keeps going where the saved one left off
  keys, ids = _batch(99, 2)
  np.testing.assert_array_equal(q.enqueue(restored, keys, ids).ids, q.enqueue(queue, keys, ids).ids)
