"""WordPiece tokenizer over the benchmark grammar: coverage, length, encoding, save / load; a
pretrained tokenizer (MiniLM's): its special ids in encoding and masking, prepare_benchmark."""

import os
import re

import jax
import numpy as np
import pytest
import tokenizers

from jaxdistill.config import base_config
from jaxdistill.data import tokenizer as tk
from jaxdistill.data.benchmark import TOKENIZER_FILE, prepare_benchmark
from jaxdistill.data.compositional import SPLITS, build_benchmark
from jaxdistill.data.fashion_mnist import load_fashion_mnist
from jaxdistill.data.masking import FIRST_WORD_ID, mask_tokens
from jaxdistill.errors import JaxDistillError
from jaxdistill.pretrained.packaged import minilm_dir


@pytest.fixture(scope="module")
def benchmark():
  return build_benchmark(load_fashion_mnist(), seed=0, num_train=8000, num_val=500,
                         num_test=1000)


@pytest.fixture(scope="module")
def tokenizer(benchmark):
  train = benchmark["train"]
  return tk.build_tokenizer([c for caps in train.captions for c in caps] + train.probe_false)


@pytest.fixture(scope="module")
def all_texts(benchmark):
  return [c for name in SPLITS for caps in benchmark[name].captions for c in caps] + \
      [c for name in SPLITS for c in benchmark[name].probe_false]


def test_special_tokens_come_first(tokenizer):
  assert [tokenizer.token_to_id(t) for t in tk.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  assert (tk.PAD_ID, tk.UNK_ID, tk.CLS_ID, tk.SEP_ID, tk.MASK_ID) == (0, 1, 2, 3, 4)
  assert 5 < tokenizer.get_vocab_size() <= 256


def test_every_benchmark_word_is_one_known_token_and_32_tokens_suffice(tokenizer, all_texts):
  lengths = []
  for text, encoding in zip(all_texts, tokenizer.encode_batch(all_texts)):
    assert tk.UNK_ID not in encoding.ids, text
    # [CLS], then one token per word or punctuation mark, then [SEP].
    assert encoding.tokens[1:-1] == re.findall(r"\w+|[^\w\s]", text.lower()), text
    assert encoding.ids[0] == tk.CLS_ID and encoding.ids[-1] == tk.SEP_ID
    lengths.append(len(encoding.ids))
  longest = int(np.argmax(lengths))
  print(f"longest caption: {lengths[longest]} tokens: {all_texts[longest]!r}")
  assert max(lengths) <= 32


def test_encode_pads_masks_and_truncates_keeping_sep(tokenizer):
  texts = ["a bag top left", "two shirts on the right and a coat with a dress below it on the left"]
  ids, mask = tk.encode(tokenizer, texts, max_len=8)
  assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == np.int32
  vocab = tokenizer.get_vocab()
  expected = [tk.CLS_ID] + [vocab[w] for w in ["a", "bag", "top", "left"]] + [tk.SEP_ID]
  np.testing.assert_array_equal(ids[0], expected + [tk.PAD_ID, tk.PAD_ID])
  np.testing.assert_array_equal(mask[0], [1] * 6 + [0, 0])
  expected_cut = [tk.CLS_ID] + [vocab[w] for w in ["two", "shirts", "on", "the", "right", "and"]]
  np.testing.assert_array_equal(ids[1], expected_cut + [tk.SEP_ID])
  np.testing.assert_array_equal(mask[1], np.ones(8))


def test_decode_round_trip(tokenizer, all_texts):
  ids, mask = tk.encode(tokenizer, all_texts[:50], max_len=32)
  for text, row, row_mask in zip(all_texts[:50], ids, mask):
    decoded = tokenizer.decode(row[row_mask == 1].tolist())
    assert decoded.replace(" ", "") == text.replace(" ", "")


def test_save_and_load_round_trip(tmp_path, tokenizer):
  path = str(tmp_path / "tokenizer.json")
  tk.save_tokenizer(tokenizer, path)
  assert os.listdir(tmp_path) == ["tokenizer.json"]  # no temporary file left behind
  loaded = tk.load_tokenizer(path)
  texts = ["a single ankle boot in the bottom right corner", "two t-shirts on top"]
  for a, b in zip(tk.encode(tokenizer, texts, 16), tk.encode(loaded, texts, 16)):
    np.testing.assert_array_equal(a, b)
  tk.save_tokenizer(tk.build_tokenizer(["a bag"], vocab_size=40), path)  # replaces in place
  assert tk.load_tokenizer(path).get_vocab_size() < tokenizer.get_vocab_size()


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tk.load_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match="vocab_size=5"):
    tk.build_tokenizer(["a bag"], vocab_size=5)
  with pytest.raises(ValueError, match="max_len=1"):
    tk.encode(tk.build_tokenizer(["a bag"], vocab_size=40), ["a bag"], max_len=1)


# ------------------------------------------------ a pretrained tokenizer: MiniLM's vocabulary

@pytest.fixture(scope="module")
def minilm_tokenizer():
  return tk.load_pretrained_tokenizer(minilm_dir())


def test_built_vocabulary_keeps_the_fixed_special_ids(tokenizer):
  assert tk.special_ids(tokenizer) == tk.SpecialIds() == tk.SpecialIds(0, 1, 2, 3, 4)
  assert tk.SpecialIds().first_word == FIRST_WORD_ID == 5


def test_minilm_special_ids_encode_and_masking(minilm_tokenizer):
  special = tk.special_ids(minilm_tokenizer)
  assert special == tk.SpecialIds(pad=0, unk=100, cls=101, sep=102, mask=103)
  assert special.first_word == 104 and minilm_tokenizer.get_vocab_size() == 30522
  texts = ["a bag top left", "two shirts on the right and a coat with a dress below it"]
  ids, mask = tk.encode(minilm_tokenizer, texts, max_len=8)   # its own padding to 128 is off
  vocab = minilm_tokenizer.get_vocab()
  np.testing.assert_array_equal(ids[0], [101] + [vocab[w] for w in "a bag top left".split()] +
                                [102, 0, 0])
  np.testing.assert_array_equal(mask[0], [1] * 6 + [0, 0])
  assert ids[1, -1] == 102 and mask[1].all()                 # cut to max_len, [SEP] kept

  batch = np.stack([ids[0]] * 256 + [ids[1]] * 256)
  batch_mask = np.stack([mask[0]] * 256 + [mask[1]] * 256)
  masked, _, weights = jax.device_get(mask_tokens(
      batch, batch_mask, jax.random.PRNGKey(0), probability=0.5,
      vocab_size=30522, special=special))
  selected = weights > 0
  assert not selected[np.isin(batch, (101, 102, 0))].any() and selected.any()
  assert (masked[selected] == 103).mean() > 0.7               # [MASK] is MiniLM's 103
  replaced = selected & (masked != 103) & (masked != batch)
  assert replaced.any() and (masked[replaced] >= 104).all() and (masked[replaced] < 30522).all()


def test_prepare_benchmark_with_minilm_tokenizer(tmp_path):
  config = base_config("tiny")
  config.data.tokenizer = minilm_dir()
  bench = prepare_benchmark(config, str(tmp_path))
  assert bench.vocab_size == 30522 and bench.special_ids.cls == 101
  ids, mask = bench.tokens["test"]
  assert (ids[..., 0] == 101).all() and (ids[mask == 0] == 0).all()
  saved = tk.load_tokenizer(str(tmp_path / TOKENIZER_FILE))   # saved in the workdir, no padding
  assert saved.get_vocab_size() == 30522 and saved.padding is None and saved.truncation is None
  config.data.tokenizer = ""                                  # the workdir's tokenizer wins
  np.testing.assert_array_equal(prepare_benchmark(config, str(tmp_path)).tokens["test"][0], ids)


def test_pretrained_tokenizer_errors(tmp_path):
  with pytest.raises(tk.TokenizerError, match=r"data\.tokenizer=.*tokenizer\.json does not exist"):
    tk.load_pretrained_tokenizer(str(tmp_path))
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(tk.TokenizerError, match=r"broken\.json is not a `tokenizers` tokenizer"):
    tk.load_pretrained_tokenizer(str(tmp_path / "broken.json"))
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  bpe.add_special_tokens(["<unk>", "<pad>"])
  bpe.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(tk.TokenizerError, match=r"no \[PAD\], \[UNK\], \[CLS\], \[SEP\], \[MASK\] "
                     r"token"):
    tk.load_pretrained_tokenizer(str(tmp_path))
  assert issubclass(tk.TokenizerError, JaxDistillError)
