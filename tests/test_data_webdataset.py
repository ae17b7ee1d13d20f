"""Webdataset shards read with tarfile, on a 2-shard fixture the test writes: brace / glob
listing, per-process shard assignment (disjoint, covering, the too-few-shards error), sample
grouping and caption forms, a damaged tar, the seed-shuffled checkpointable stream and the
training pipeline over it (skips counted, two hosts, one modality for stage 1)."""

import json
import tarfile

import numpy as np
import pytest

from jaxdistill.data.real import pipeline, webdataset as wds
from jaxdistill.data.real.image_ops import ImageSpec
from jaxdistill.data.real.records import DataError
from jaxdistill.data.real.text import TextEncoder
from jaxdistill.pretrained.packaged import minilm_dir
from real_data_fixtures import (WDS_CORRUPT, WDS_EMPTY_CAPTION, WDS_NO_IMAGE, add_member,
                                caption, jpeg_bytes, wds_key, write_webdataset)

ALL_KEYS = [wds_key(s, i) for s in range(2) for i in range(5)]
GOOD_KEYS = [k for k in ALL_KEYS if k not in (WDS_CORRUPT, WDS_NO_IMAGE, WDS_EMPTY_CAPTION)]
SPEC = ImageSpec(size=16, resize=16)


@pytest.fixture
def shards(tmp_path):
  return [str(p) for p in write_webdataset(tmp_path)]


@pytest.fixture(scope="module")
def encoder():
  return TextEncoder.from_file(minilm_dir(), max_len=16)


def _keys(samples):
  return [s.record.key for s in samples]


def test_expand_braces():
  assert wds.expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
  assert wds.expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
  assert wds.expand_braces("plain.tar") == ["plain.tar"]
  with pytest.raises(DataError, match=r"range \{5..3\} runs backwards"):
    wds.expand_braces("s-{5..3}.tar")


def test_list_shards_by_brace_glob_and_list(shards, tmp_path):
  assert wds.list_shards(f"{tmp_path}/shards-{{000000..000001}}.tar") == shards
  assert wds.list_shards(f"{tmp_path}/shards-*.tar") == shards
  assert wds.list_shards(shards[::-1] + shards[:1]) == shards       # sorted, de-duplicated
  with pytest.raises(DataError, match="shards-000002.tar .*does not exist"):
    wds.list_shards(f"{tmp_path}/shards-{{000000..000002}}.tar")
  with pytest.raises(DataError, match="no file matches"):
    wds.list_shards(f"{tmp_path}/other-*.tar")


def test_shards_for_process_are_disjoint_and_cover():
  shards = [f"s{i}.tar" for i in range(7)]
  parts = [wds.shards_for_process(shards, p, 3) for p in range(3)]
  assert [[n for n, _ in part] for part in parts] == [[0, 3, 6], [1, 4], [2, 5]]
  assert sorted(path for part in parts for _, path in part) == shards
  with pytest.raises(DataError, match="2 shards for 3 processes.*at least 3 shards"):
    wds.shards_for_process(shards[:2], 0, 3)


def test_iter_tar_groups_members_by_key(shards):
  samples = list(wds.iter_tar(shards[0]))
  assert [s["__key__"] for s in samples] == [wds_key(0, i) for i in range(5)]
  assert set(samples[0]) == {"__key__", "jpg", "txt"}
  assert set(samples[3]) == {"__key__", "txt"}                        # the sample without image
  assert samples[1]["txt"] == caption(1, 0).encode()
  assert [s["__key__"] for s in wds.iter_tar(shards[0], skip=3)] == [wds_key(0, 3), wds_key(0, 4)]
  assert wds.count_samples(shards) == 10


def test_captions_from_txt_and_every_json_form(shards):
  records = [wds.sample_to_record(s) for s in wds.iter_tar(shards[1])]
  text = [caption(100 + i, 0) for i in range(5)]
  assert [r.captions for r in records] == [
      (text[0],), (text[1], text[1] + " again"), (text[2],), (text[3],), ("",)]
  assert records[2].image_id == 102 and records[2].key == "000000102"
  assert records[0].image == jpeg_bytes(100)
  assert wds.sample_captions({"json": json.dumps({"captions": "one"}).encode()}) == ("one",)
  assert wds.sample_captions({"json": b"{broken"}) == ()


def test_a_damaged_tar_ends_with_a_corrupt_marker(tmp_path):
  path = tmp_path / "cut.tar"
  with tarfile.open(path, "w") as tar:
    for i in range(3):
      add_member(tar, f"{i:04d}.jpg", jpeg_bytes(i, (40, 40)))
      add_member(tar, f"{i:04d}.txt", b"words")
  data = path.read_bytes()
  path.write_bytes(data[:1536] + b"\x07" * 700)     # header + data of the first member, then junk
  samples = list(wds.iter_tar(str(path)))
  assert samples[-1]["__error__"] == "corrupt"
  assert wds.sample_to_record(samples[-1]).error == "corrupt"


def test_stream_order_is_seeded_and_checkpointable(shards):
  def take(stream, n, state=None):
    it = iter(stream)
    if state is not None:
      it.set_state(state)
    return [next(it) for _ in range(n)], it.get_state()

  stream = wds.ShardStream(shards, seed=7)
  first, _ = take(stream, 20)                                          # two epochs
  again, _ = take(wds.ShardStream(shards, seed=7), 20)
  assert _keys(first) == _keys(again)
  for epoch in (0, 1):
    keys = _keys(first[10 * epoch:10 * epoch + 10])
    assert sorted(keys) == ALL_KEYS
    order = [s.shard for s in first[10 * epoch:10 * epoch + 10:5]]
    assert keys == [wds_key(shard, i) for shard in order for i in range(5)]  # in tar order
    assert [s.epoch for s in first[10 * epoch:10 * epoch + 10]] == [epoch] * 10
  orders = {tuple(s.shard for s in take(wds.ShardStream(shards, seed=seed), 10)[0][::5])
            for seed in range(8)}
  assert orders == {(0, 1), (1, 0)}                                    # the seed shuffles shards
  head, state = take(stream, 7)                                        # mid-shard
  assert state == {"epoch": 0, "position": 1, "sample": 2}
  rest, _ = take(stream, 6, state)
  assert _keys(rest) == _keys(first[7:13])
  assert [(s.epoch, s.shard, s.index) for s in rest] == [(s.epoch, s.shard, s.index)
                                                         for s in first[7:13]]
  assert len(list(wds.ShardStream(shards, seed=None, num_epochs=1))) == 10


def test_two_hosts_read_disjoint_shards_covering_the_data_once(shards):
  keys = [_keys(wds.ShardStream(shards, seed=3, process_index=p, process_count=2, num_epochs=1))
          for p in (0, 1)]
  assert keys == [[wds_key(0, i) for i in range(5)], [wds_key(1, i) for i in range(5)]]
  with pytest.raises(DataError, match="2 shards for 4 processes"):
    wds.ShardStream(shards, seed=0, process_index=0, process_count=4)


def _shard_one_first(shards):
  """A seed whose first epoch reads shard 1 first: its last sample (000000004) is good, so a
  batch of all good samples also counts every skip (skips after a finite stream's last batch
  go uncounted)."""
  return next(s for s in range(20) if wds.ShardStream(shards, seed=s).order(0)[0][0] == 1)


def _stream(shards, encoder=None, **kwargs):
  args = dict(global_batch_size=2, seed=1, text=encoder,
              transform=pipeline.TrainTransform(image=SPEC)) | kwargs
  return pipeline.stream_train_dataset(shards, **args)


def test_pipeline_over_shards_skips_counts_and_resumes(shards, encoder, tmp_path):
  batches = list(_stream(f"{tmp_path}/shards-{{000000..000001}}.tar", encoder, num_epochs=1))
  assert len(batches) == 3                            # 7 good samples: the last odd one is dropped
  keys = [f"{i:09d}" for b in batches for i in b["image_id"]]
  assert len(set(keys)) == 6 and set(keys) <= set(GOOD_KEYS)
  whole = list(_stream(shards, encoder, num_epochs=1, global_batch_size=7,
                       seed=_shard_one_first(shards)))
  assert len(whole) == 1 and sorted(f"{i:09d}" for i in whole[0]["image_id"]) == GOOD_KEYS
  assert whole[0]["stats"] == {"missing": 1, "corrupt": 1, "no_caption": 1}
  assert batches[0]["image"].shape == (2, 16, 16, 3) and batches[0]["text_ids"].shape == (2, 16)
  for b in batches:
    for image_id, ids in zip(b["image_id"], b["text_ids"]):
      np.testing.assert_array_equal(ids, encoder.encode([caption(int(image_id), 0)])[0][0])
  # resume: the state after 2 batches, restored in a new iterator, gives the same third batch
  it = iter(_stream(shards, encoder))
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = next(it)
  resumed = iter(_stream(shards, encoder))
  resumed.set_state(state)
  got = next(resumed)
  for key in ("image", "image_id", "text_ids", "caption_index"):
    np.testing.assert_array_equal(got[key], expected[key])


def test_pipeline_reads_one_modality_for_stage_one(shards, encoder):
  seed = _shard_one_first(shards)
  images = next(iter(_stream(shards, global_batch_size=8, num_epochs=1, seed=seed,
                             transform=pipeline.TrainTransform(image=SPEC, fields="image"))))
  assert set(images) == {"image", "image_id", "stats"}              # captions never read
  assert images["stats"] == {"missing": 1, "corrupt": 1, "no_caption": 0}
  assert sorted(f"{i:09d}" for i in images["image_id"]) == sorted(
      k for k in ALL_KEYS if k not in (WDS_CORRUPT, WDS_NO_IMAGE))   # the empty caption's too
  texts = next(iter(_stream(shards, encoder, global_batch_size=9, num_epochs=1, seed=seed,
                            transform=pipeline.TrainTransform(fields="text"))))
  assert {"text_ids", "text_mask", "image_id", "caption_index"} <= set(texts)
  assert "image" not in texts                                        # images never decoded
  assert texts["stats"] == {"missing": 0, "corrupt": 0, "no_caption": 1}
