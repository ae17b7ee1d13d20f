"""Image transforms (decode, RandomResizedCrop + flip, resize + centre crop, normalisation from
preprocessor_config.json, parity with transformers' CLIPImageProcessor), the tokenizer-agnostic
text encoder, unpaired corpora, and the grain pipelines: threads do not change batches, the
iterator state after k batches restores to the same next batch, the evaluation batches of
several hosts cover a split once, and runs of bad items fail loudly."""

import json

import numpy as np
import pytest
import tokenizers
from PIL import Image
from tokenizers import models, pre_tokenizers, processors

from jaxdistill.data import tokenizer as bench_tokenizer
from jaxdistill.data.real import corpora, image_ops, karpathy, pipeline
from jaxdistill.data.real.image_ops import CLIP_MEAN, CLIP_STD, BadImage, ImageSpec
from jaxdistill.data.real.records import DataError, PairedRecord
from jaxdistill.data.real.text import TextEncoder
from jaxdistill.pretrained.packaged import minilm_dir
from real_data_fixtures import (COCO_ID_BASE, CORRUPT, EMPTY_CAPTION, MISSING, jpeg_bytes,
                                write_karpathy)

SPEC = ImageSpec(size=32, resize=36)


@pytest.fixture(scope="module")
def encoder():
  return TextEncoder.from_file(minilm_dir(), max_len=16)


@pytest.fixture
def train_split(tmp_path):
  json_path, image_root = write_karpathy(tmp_path)
  return karpathy.load_karpathy(str(json_path), str(image_root)).split("train+restval")


def _noise(width, height, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                                              dtype=np.uint8))


# ------------------------------------------------------------------------------ image transforms


def test_decode_image_sources_and_failures(tmp_path):
  data = jpeg_bytes(0, (30, 20))
  (tmp_path / "a.jpg").write_bytes(data)
  assert image_ops.decode_image(str(tmp_path / "a.jpg")).size == (30, 20)
  assert image_ops.decode_image(data).mode == "RGB"
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)          # tfds grayscale [H, W, 1]
  rgb = np.asarray(image_ops.decode_image(gray))
  assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == gray[..., 0]).all()
  cases = {"missing": [str(tmp_path / "none.jpg"), None],
           "corrupt": [b"not an image", data[:len(data) // 2], np.zeros((2, 2, 5), np.uint8)]}
  for reason, images in cases.items():
    for image in images:
      with pytest.raises(BadImage) as raised:
        image_ops.decode_image(image)
      assert raised.value.reason == reason, image if not isinstance(image, bytes) else len(image)


def test_random_resized_box_stays_in_scale_and_ratio():
  rng = np.random.default_rng(0)
  for width, height in ((200, 100), (64, 64), (50, 120)):
    for _ in range(200):
      left, top, w, h = image_ops.random_resized_box(width, height, rng)
      assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
      # scale (0.9, 1.0), ratio (3/4, 4/3), up to rounding; a 2:1 image needs the fallback
      if width / height <= 4 / 3 + 1e-9 and height / width <= 4 / 3 + 1e-9:
        assert 0.9 * width * height * 0.96 <= w * h <= width * height
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
  assert image_ops.random_resized_box(200, 100, rng, scale=(1.0, 1.0)) == (33, 0, 133, 100)


def test_train_image_flips_half_the_time_and_is_seeded():
  image = _noise(48, 40)
  data = np.asarray(image)
  flipped = 0
  for seed in range(24):
    plain = image_ops.train_image(data, SPEC, np.random.default_rng(seed), flip=False)
    maybe = image_ops.train_image(data, SPEC, np.random.default_rng(seed))
    np.testing.assert_array_equal(maybe, image_ops.train_image(data, SPEC,
                                                               np.random.default_rng(seed)))
    assert maybe.shape == (32, 32, 3) and maybe.dtype == np.float32
    if not np.array_equal(maybe, plain):
      np.testing.assert_array_equal(maybe, plain[:, ::-1])
      flipped += 1
  assert 4 <= flipped <= 20
  whole = image_ops.train_image(data, SPEC, np.random.default_rng(0), scale=(1.0, 1.0),
                                ratio=(48 / 40, 48 / 40), flip=False, normalize=False)
  np.testing.assert_array_equal(whole, np.asarray(image.resize((32, 32), Image.BICUBIC)))


def test_eval_image_matches_clip_image_processor():
  transformers = pytest.importorskip("transformers")
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224},
                                              crop_size={"height": 224, "width": 224},
                                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
  spec = ImageSpec(size=224, resize=224)
  for width, height in ((300, 257), (225, 401), (97, 80)):
    image = _noise(width, height, seed=width)
    expected = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = image_ops.eval_image(np.asarray(image), spec)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_image_spec_from_preprocessor_config(tmp_path):
  clip_old = {"crop_size": 224, "do_center_crop": True, "image_mean": list(CLIP_MEAN),
              "image_std": list(CLIP_STD), "resample": 3, "size": 224}
  (tmp_path / "clip").mkdir()
  (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(clip_old))
  assert ImageSpec.from_preprocessor_config(str(tmp_path / "clip")) == ImageSpec()
  timm_like = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
               "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
               "resample": 2}
  (tmp_path / "timm.json").write_text(json.dumps(timm_like))
  spec = ImageSpec.from_preprocessor_config(str(tmp_path / "timm.json"))
  assert (spec.size, spec.resize, spec.resample) == (224, 256, 2)
  assert spec.mean == image_ops.IMAGENET_MEAN and spec.std == image_ops.IMAGENET_STD
  assert spec.at_size(112).resize == 128                              # the 256/224 ratio kept
  assert ImageSpec.from_preprocessor_config(str(tmp_path / "timm.json"), size=448).resize == 512
  vit = {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "do_resize": True}
  (tmp_path / "vit.json").write_text(json.dumps(vit))
  spec = ImageSpec.from_preprocessor_config(str(tmp_path / "vit.json"))
  assert (spec.size, spec.resize, spec.mean) == (384, 0, (0.5, 0.5, 0.5))   # straight resize
  assert image_ops.eval_image(np.zeros((10, 30, 3), np.uint8), spec).shape == (384, 384, 3)
  with pytest.raises(DataError, match="nowhere/preprocessor_config.json does not exist"):
    ImageSpec.from_preprocessor_config(str(tmp_path / "nowhere" / "preprocessor_config.json"))
  (tmp_path / "model.json").write_text(json.dumps({"hidden_size": 768}))
  with pytest.raises(DataError, match="lacks image_mean, image_std, size"):
    ImageSpec.from_preprocessor_config(str(tmp_path / "model.json"))


def test_normalisation_and_uint8_output():
  image = Image.fromarray(np.full((40, 40, 3), 255, np.uint8))
  out = image_ops.eval_image(np.asarray(image), SPEC)
  np.testing.assert_allclose(out[0, 0], (1 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD),
                             rtol=1e-6)
  raw = image_ops.eval_image(np.asarray(image), SPEC, normalize=False)
  assert raw.dtype == np.uint8 and (raw == 255).all()


# ----------------------------------------------------------------------------------------- text


def _clip_like_bpe():
  """A byte-level BPE with CLIP's <|startoftext|> / <|endoftext|> and no [PAD] or padding."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {c: i for i, c in enumerate(sorted(alphabet))}
  vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
  tok = tokenizers.Tokenizer(models.BPE(vocab, []))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>",
      special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]),
                      ("<|endoftext|>", vocab["<|endoftext|>"])])
  return tok, vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def test_text_encoder_with_bert_and_bpe_tokenizers(tmp_path):
  minilm = TextEncoder.from_file(minilm_dir(), max_len=8)
  texts = ["a dog", "a dog runs across the wide green field today"]
  expected = bench_tokenizer.encode(bench_tokenizer.load_pretrained_tokenizer(minilm_dir()),
                                    texts, 8)
  for got, want in zip(minilm.encode(texts), expected):
    np.testing.assert_array_equal(got, want)                      # [SEP] kept when cut
  tok, start, end = _clip_like_bpe()
  bpe = TextEncoder(tok, max_len=6)
  assert bpe.pad_id == end                                        # CLIP pads with <|endoftext|>
  ids, mask = bpe.encode(["ab", "abcdefgh"])
  assert ids[0].tolist() == [start, tok.token_to_id("a"), tok.token_to_id("b"), end, end, end]
  assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
  assert ids[1, 0] == start and ids[1, -1] == end                 # cut, its end token kept
  tok.save(str(tmp_path / "tokenizer.json"))
  reloaded = TextEncoder.from_file(str(tmp_path), max_len=6)       # a checkpoint directory
  assert reloaded.encode(["ab"])[0].tolist() == [ids[0].tolist()]
  with pytest.raises(DataError, match="tokenizer .*/nothere does not exist: point at"):
    TextEncoder.from_file(str(tmp_path / "nothere"), max_len=6)


# ------------------------------------------------------------------------------------- pipeline


def _train(source, encoder, **kwargs):
  args = dict(global_batch_size=3, seed=0, text=encoder,
              transform=pipeline.TrainTransform(image=SPEC)) | kwargs
  return pipeline.train_dataset(source, **args)


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if key == pipeline.STATS:
      assert a[key] == b[key]
    else:
      np.testing.assert_array_equal(a[key], b[key])


def test_batches_do_not_depend_on_threads_or_prefetch(train_split, encoder):
  reference = iter(_train(train_split, encoder, num_threads=1, prefetch=False))
  threaded = iter(_train(train_split, encoder, num_threads=4, prefetch=True))
  for _ in range(5):
    _assert_same(next(reference), next(threaded))


@pytest.mark.parametrize("prefetch", [False, True])
def test_state_after_k_batches_restores_the_next_batch(train_split, encoder, prefetch):
  it = iter(_train(train_split, encoder, prefetch=prefetch))
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert list(state) == ["next_index"] and state["next_index"] >= 9   # items read so far
  expected = [next(it) for _ in range(2)]
  restored = iter(_train(train_split, encoder, prefetch=prefetch))
  next(restored)                                                   # a used iterator, moved back
  restored.set_state(json.loads(json.dumps(state)))
  for want in expected:
    _assert_same(next(restored), want)


def test_captions_are_drawn_per_epoch_and_never_empty(train_split, encoder):
  it = iter(_train(train_split, encoder, global_batch_size=6))
  drawn = {}
  for _ in range(12):                                              # 12 epochs of 6 good images
    batch = next(it)
    for image_id, slot in zip(batch["image_id"], batch["caption_index"]):
      drawn.setdefault(int(image_id) - COCO_ID_BASE, []).append(int(slot))
  assert all(len(slots) == 12 for slots in drawn.values())
  assert 1 not in drawn[EMPTY_CAPTION]                            # its empty caption is skipped
  assert all(len(set(slots)) > 1 for slots in drawn.values())     # redrawn across epochs
  assert all(0 <= s < 5 for slots in drawn.values() for s in slots)


def test_multiple_tokenizers_give_prefixed_fields(train_split, encoder):
  tok, _, _ = _clip_like_bpe()
  batch = next(iter(_train(train_split, {"": encoder, "clip": TextEncoder(tok, max_len=40)})))
  assert batch["text_ids"].shape == (3, 16) and batch["clip_text_ids"].shape == (3, 40)
  assert batch["clip_text_mask"].sum(1).min() > 2
  arrays, stats = pipeline.pop_stats(batch)
  assert pipeline.STATS not in arrays and set(stats) == set(pipeline.SKIP_REASONS)


def test_a_run_of_bad_items_fails_loudly(tmp_path, encoder):
  source = [PairedRecord(image_id=i, image=str(tmp_path / f"{i}.jpg"), captions=("x",))
            for i in range(5)]
  it = iter(_train(source, encoder, max_consecutive_skips=12))
  with pytest.raises(DataError, match=r"12 training items in a row were unusable \(last: missing"):
    next(it)


def test_eval_batches_of_two_hosts_cover_the_split_once(train_split):
  per_host = [list(pipeline.eval_dataset(train_split, batch_size=3, image=SPEC, process_index=p,
                                         process_count=2)) for p in (0, 1)]
  assert [len(batches) for batches in per_host] == [2, 2]          # same step count on each host
  indices, valid, stats = [], {}, {"missing": 0, "corrupt": 0}
  for batches in per_host:
    for b in batches:
      assert b["image"].shape == (3, 32, 32, 3)
      for index, ok, image_id, image in zip(b["index"], b["valid"], b["image_id"], b["image"]):
        if index >= 0:
          indices.append(int(index))
          valid[int(index)] = int(ok)
          if ok:
            assert image_id == train_split[index].image_id
            np.testing.assert_array_equal(image, image_ops.eval_image(train_split[index].image,
                                                                      SPEC))
          else:
            assert image_id == -1 and not image.any()
      for reason in stats:
        stats[reason] += b["stats"][reason]
  assert sorted(indices) == list(range(8))
  assert [i for i, ok in valid.items() if not ok] == [CORRUPT, MISSING]
  assert stats == {"missing": 1, "corrupt": 1}


def test_eval_texts_are_image_major_without_empty_captions(train_split, encoder):
  fields, stats = pipeline.eval_texts(train_split, encoder)
  assert stats == {"empty_caption": 1}
  assert fields["text_ids"].shape == (39, 16)                      # 8 x 5 captions, one empty
  assert np.all(np.diff(fields["caption_to_index"]) >= 0)
  slots = fields["caption_index"][fields["caption_to_index"] == EMPTY_CAPTION]
  assert slots.tolist() == [0, 2, 3, 4]


# ----------------------------------------------------------------------------- unpaired corpora


def test_unpaired_image_folder_and_text_file(tmp_path, encoder):
  (tmp_path / "imgs" / "sub").mkdir(parents=True)
  for i in range(4):
    (tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.JPG").write_bytes(jpeg_bytes(i))
  (tmp_path / "imgs" / "broken.png").write_bytes(b"nope")
  (tmp_path / "imgs" / "notes.txt").write_text("not an image")
  folder = corpora.ImageFolder(str(tmp_path / "imgs"))
  assert folder.keys == ["0.JPG", "2.JPG", "broken.png", "sub/1.JPG", "sub/3.JPG"]
  images = _train(folder, None, global_batch_size=4,
                  transform=pipeline.TrainTransform(image=SPEC, fields="image"))
  batch = next(iter(images))
  assert set(batch) == {"image", "image_id", "stats"} and batch["image"].shape == (4, 32, 32, 3)
  assert sorted(batch["image_id"].tolist()) == [0, 1, 3, 4]          # broken.png (2) skipped
  order = [index for index, _ in pipeline.train_order(5, 0)[:5]]
  read_broken = order.index(2) < max(order.index(i) for i in (0, 1, 3, 4))
  assert batch["stats"] == {"missing": 0, "corrupt": int(read_broken), "no_caption": 0}

  (tmp_path / "texts.txt").write_text("a red car\n\nTwo dogs\nthe sky\n")
  corpus = corpora.TextCorpus(str(tmp_path / "texts.txt"))
  assert len(corpus) == 4 and corpus[1].captions == ("",) and corpus[2].image is None
  it = iter(_train(corpus, encoder, transform=pipeline.TrainTransform(fields="text")))
  batches = [next(it) for _ in range(2)]
  assert all(set(b) == {"text_ids", "text_mask", "image_id", "caption_index", "stats"}
             for b in batches)
  assert sorted(batches[0]["image_id"].tolist()) == [0, 2, 3]       # the blank line skipped
  assert sum(b["stats"]["no_caption"] for b in batches) >= 1
  with pytest.raises(DataError, match="image folder .*nothing is not a directory"):
    corpora.ImageFolder(str(tmp_path / "nothing"))
  with pytest.raises(DataError, match="text corpus .*none.txt does not exist"):
    corpora.TextCorpus(str(tmp_path / "none.txt"))
