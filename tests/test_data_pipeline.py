"""The grain training stream (group batches, captions, resume, process shares), evaluation
arrays and global-array assembly on an 8-device mesh."""

import collections

import jax
import numpy as np
import pytest

from jaxdistill.data import pipeline
from jaxdistill.data.compositional import build_benchmark, normalize_images
from jaxdistill.data.fashion_mnist import load_fashion_mnist

N, L, GROUP = 64, 6, 4


@pytest.fixture(scope="module")
def split():
  return build_benchmark(load_fashion_mnist(), seed=0, num_train=N, num_val=8, num_test=8)["train"]


@pytest.fixture(scope="module")
def tokens():
  """Caption c of image i has ids (i * 5 + c) * L + [0, L): the ids say which caption was taken."""
  ids = np.arange(N * 5 * L, dtype=np.int32).reshape(N, 5, L)
  return ids, (ids % 2).astype(np.int32)


def _batches(split, tokens, count, **kwargs):
  args = dict(global_batch_size=16, group_size=GROUP, seed=0) | kwargs
  it = iter(pipeline.train_dataset(split, *tokens, **args))
  return [next(it) for _ in range(count)]


def test_batches_are_whole_groups_with_own_images_and_captions(split, tokens):
  for batch in _batches(split, tokens, 3):
    assert batch["image"].shape == (16, 56, 56, 1) and batch["image"].dtype == np.float32
    assert batch["text_ids"].shape == batch["text_mask"].shape == (16, L)
    assert all(batch[k].dtype == np.int32 for k in ("text_ids", "text_mask", "image_id",
                                                     "group_id"))
    counts = collections.Counter(batch["group_id"].tolist())
    assert len(counts) == 4 and set(counts.values()) == {GROUP}
    example = batch["image_id"] - split.image_ids[0]  # train ids are 0..N-1
    np.testing.assert_array_equal(split.group_ids[example], batch["group_id"])
    np.testing.assert_array_equal(batch["image"], normalize_images(split.images[example]))
    image_of_caption = batch["text_ids"][:, 0] // (5 * L)
    np.testing.assert_array_equal(image_of_caption, example)
    np.testing.assert_array_equal(batch["text_mask"], batch["text_ids"] % 2)


def test_each_epoch_visits_every_group_once_in_a_new_order(split, tokens):
  batches = _batches(split, tokens, 8)  # 16 groups, 4 per batch: 4 steps per epoch
  epochs = [np.concatenate([b["group_id"] for b in batches[e * 4:(e + 1) * 4]]) for e in (0, 1)]
  for groups in epochs:
    assert sorted(set(groups.tolist())) == sorted(set(split.group_ids.tolist()))
    assert len(groups) == N
  assert not np.array_equal(epochs[0], epochs[1])
  chosen = [np.concatenate([b["text_ids"][:, 0] for b in batches[e * 4:(e + 1) * 4]]) % (5 * L)
            for e in (0, 1)]
  assert len(set(chosen[0].tolist())) > 1  # captions drawn, not always the first
  order = [np.argsort(np.concatenate([b["image_id"] for b in batches[e * 4:(e + 1) * 4]]))
           for e in (0, 1)]
  assert not np.array_equal(chosen[0][order[0]], chosen[1][order[1]])  # redrawn each epoch


def test_same_seed_same_stream_other_seed_other_stream(split, tokens):
  first, again = _batches(split, tokens, 3), _batches(split, tokens, 3)
  other = _batches(split, tokens, 3, seed=1)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not all(np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(first, other))


def test_resume_from_iterator_state(split, tokens):
  dataset = pipeline.train_dataset(split, *tokens, global_batch_size=16, group_size=GROUP, seed=5)
  it = iter(dataset)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = iter(pipeline.train_dataset(split, *tokens, global_batch_size=16, group_size=GROUP,
                                      seed=5))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_parts_of_the_same_global_batch(split, tokens):
  whole = _batches(split, tokens, 2)
  parts = [_batches(split, tokens, 2, process_index=p, process_count=2) for p in (0, 1)]
  for step in range(2):
    assert parts[0][step]["image"].shape[0] == 8
    for key in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])


def test_group_size_one_shuffles_examples(split, tokens):
  batches = _batches(split, tokens, 4, group_size=1)  # one epoch
  ids = np.concatenate([b["image_id"] for b in batches])
  np.testing.assert_array_equal(np.sort(ids), split.image_ids)
  assert not np.array_equal(ids, split.image_ids)
  # Groups are split up: a batch no longer holds whole groups.
  assert any(set(collections.Counter(b["group_id"].tolist()).values()) != {GROUP}
             for b in batches)


@pytest.mark.parametrize("kwargs, complaint", [
    (dict(global_batch_size=10), "multiple of group_size=4"),
    (dict(group_size=2, global_batch_size=16), "group_size=2 does not match"),
    (dict(global_batch_size=128), "exceeds the 64 training examples"),
    (dict(process_index=2, process_count=2), "process_index=2"),
])
def test_bad_arguments_raise(split, tokens, kwargs, complaint):
  args = dict(global_batch_size=16, group_size=GROUP, seed=0) | kwargs
  with pytest.raises(ValueError, match=complaint):
    pipeline.train_dataset(split, *tokens, **args)


def test_eval_arrays(split, tokens):
  arrays = pipeline.eval_arrays(split, *tokens)
  assert arrays["image"].shape == (N, 56, 56, 1)
  assert arrays["text_ids"].shape == arrays["text_mask"].shape == (N * 5, L)
  caption_to_image = arrays["caption_to_image"]
  assert caption_to_image.dtype == np.int32
  np.testing.assert_array_equal(caption_to_image, np.arange(N * 5) // 5)
  np.testing.assert_array_equal(arrays["text_ids"][:, 0] // (5 * L), caption_to_image)
  np.testing.assert_array_equal(arrays["text_ids"][7], tokens[0][1, 2])


def test_to_global_batch_on_an_8_device_mesh(split, tokens):
  """Each field is placed with its own sharding: the trainer's "batch/<field>" rules (batch dim
  over data x fsdp) give 8 row blocks in order; a field given another sharding keeps it."""
  from jaxdistill.config import base_config, sharding_rules
  from jaxdistill.parallel.mesh import BATCH_AXES, make_mesh, replicated
  from jaxdistill.parallel.sharding import tree_shardings
  assert jax.device_count() == 8
  mesh = make_mesh(data=2, fsdp=4)
  batch = _batches(split, tokens, 1)[0]
  config = base_config("tiny")
  shardings = tree_shardings(pipeline.global_batch_spec(batch), mesh, sharding_rules(config),
                             config.sharding.min_fsdp_size, prefix="batch")
  arrays = pipeline.to_global_batch(batch, shardings)
  assert set(arrays) == set(batch)
  for key, value in arrays.items():
    assert value.shape == batch[key].shape and value.dtype == batch[key].dtype
    assert value.sharding.spec == jax.sharding.PartitionSpec(BATCH_AXES)
    np.testing.assert_array_equal(np.asarray(value), batch[key])
    shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8
    for k, shard in enumerate(shards):
      np.testing.assert_array_equal(np.asarray(shard.data), batch[key][2 * k:2 * k + 2])
  mixed = pipeline.to_global_batch(batch, dict(shardings, image_id=replicated(mesh)))
  assert mixed["image_id"].sharding.is_fully_replicated
  for shard in mixed["image_id"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), batch["image_id"])
  assert mixed["image"].sharding.spec == jax.sharding.PartitionSpec(BATCH_AXES)


def test_benchmark_stream_carries_a_teachers_own_token_ids(tmp_path):
  """Benchmark.train_dataset(texts={name: tokenize}): each example's caption also as
  <name>_text_ids / _mask in that vocabulary (a teacher's own), the same caption as text_ids."""
  from conftest import recipe_config
  from jaxdistill.data.benchmark import prepare_benchmark
  from jaxdistill.data.real.text import TextEncoder
  from jaxdistill.pretrained.packaged import minilm_dir
  config = recipe_config("dual")
  bench = prepare_benchmark(config, str(tmp_path))
  minilm = TextEncoder.from_file(minilm_dir(), max_len=40)
  it = iter(bench.train_dataset(config, "train", process_index=0, process_count=1,
                                texts={"teacher": minilm.encode}))
  batch = next(it)
  assert batch["teacher_text_ids"].shape == (config.batch_size, 40)
  train = bench.splits["train"]
  row = {int(i): r for r, i in enumerate(train.image_ids)}
  captions = [train.captions[row[int(i)]][int(c)]
              for i, c in zip(batch["image_id"], batch["caption_index"])]
  want_ids, want_mask = minilm.encode(captions)
  np.testing.assert_array_equal(batch["teacher_text_ids"], want_ids)
  np.testing.assert_array_equal(batch["teacher_text_mask"], want_mask)
  own_ids, _ = bench.tokens["train"]
  np.testing.assert_array_equal(batch["text_ids"],
                                own_ids[[row[int(i)] for i in batch["image_id"]],
                                        batch["caption_index"]])
