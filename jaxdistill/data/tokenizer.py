"""The text tokenizer: a BERT-style WordPiece vocabulary (Devlin et al. 2019) trained on the
benchmark's captions with the `tokenizers` library, or a pretrained one (e.g. MiniLM's
tokenizer.json); its (atomic) saving and loading, its special-token ids, and encoding to
fixed-length id / mask arrays."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from jaxdistill.atomic import atomic_open
from jaxdistill.errors import JaxDistillError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))   # build_tokenizer ids


class TokenizerError(JaxDistillError, ValueError):
  """A pretrained tokenizer that cannot be read or lacks BERT's special tokens."""


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of [PAD], [UNK], [CLS], [SEP], [MASK] in one vocabulary (default: build_tokenizer's)."""
  pad: int = PAD_ID
  unk: int = UNK_ID
  cls: int = CLS_ID
  sep: int = SEP_ID
  mask: int = MASK_ID

  @property
  def first_word(self) -> int:
    """Smallest id above every special token (build_tokenizer: 5; BERT / MiniLM: 104)."""
    return max(dataclasses.astuple(self)) + 1


class Vocabulary:
  """vocab_size and special_ids of `self.tokenizer`: a mixin of the datasets a run reads
  (data/benchmark.py Benchmark, data/real/dataset.py RealData)."""
  tokenizer: tokenizers.Tokenizer

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  @property
  def special_ids(self) -> SpecialIds:
    return special_ids(self.tokenizer)


def special_ids(tokenizer: tokenizers.Tokenizer) -> SpecialIds:
  """The tokenizer's SpecialIds; TokenizerError if one of SPECIAL_TOKENS is not in its vocab."""
  ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
  if missing := [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]:
    raise TokenizerError(f"the tokenizer has no {', '.join(missing)} token: jaxdistill needs a "
                         f"BERT-style vocabulary with {', '.join(SPECIAL_TOKENS)}; use such a "
                         "tokenizer (e.g. MiniLM's) or leave --config.data.tokenizer empty")
  return SpecialIds(*ids)


def build_tokenizer(texts: list[str], vocab_size: int = 256) -> tokenizers.Tokenizer:
  """A lowercasing WordPiece tokenizer for `texts`; encodings are [CLS] ... [SEP].

  The vocabulary is deterministic (the same texts give the same ids in every process, which a
  resumed run and an export rely on): the special tokens (PAD_ID..MASK_ID = 0..4), every
  character and its "##" continuation (so any word of those characters still tokenises), then
  whole words by descending frequency (ties alphabetically) up to vocab_size."""
  tokenizer = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  counts: dict[str, int] = {}
  for text in texts:
    for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)):
      counts[word] = counts.get(word, 0) + 1
  chars = sorted({c for word in counts for c in word})
  base = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
  if vocab_size < len(base):
    raise ValueError(f"vocab_size={vocab_size} cannot hold the {len(base)} special and character "
                     "tokens of these texts; raise --config.data.vocab_size")
  words = sorted((w for w in counts if w not in base), key=lambda w: (-counts[w], w))
  vocab = {token: i for i, token in enumerate(base + words[:vocab_size - len(base)])}
  tokenizer.model = models.WordPiece(vocab, unk_token="[UNK]")
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))   # already in vocab: marks them special
  tokenizer.decoder = decoders.WordPiece()
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
  for token_id, token in enumerate(SPECIAL_TOKENS):
    assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
  return tokenizer


def save_tokenizer(tokenizer: tokenizers.Tokenizer, path: str) -> None:
  """Writes the tokenizer JSON to `path` via a temporary file and a rename (never half-written)."""
  with atomic_open(path, "w", encoding="utf-8") as f:
    f.write(tokenizer.to_str())


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Reads a tokenizer written by save_tokenizer."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist: it is written by the first "
                            "run in a workdir; point at that workdir or delete the run to rebuild")
  return tokenizers.Tokenizer.from_file(path)


def load_pretrained_tokenizer(path: str) -> tokenizers.Tokenizer:
  """A pretrained tokenizer: `path` is a tokenizer.json or a Hugging Face directory holding one.
  Its own padding and truncation are turned off (encode pads and cuts to max_len)."""
  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise TokenizerError(f"--config.data.tokenizer={path!r}: {file} does not exist; point it at "
                         "a tokenizer.json or a Hugging Face model directory holding one (e.g. "
                         "MiniLM's), or leave it empty to build a vocabulary from the captions")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a bare Exception for malformed files
    raise TokenizerError(f"--config.data.tokenizer={path!r}: {file} is not a `tokenizers` "
                         f"tokenizer.json ({e}); save it with tokenizer.save()") from e
  tokenizer.no_padding()
  tokenizer.no_truncation()
  special_ids(tokenizer)   # refuses a vocabulary without BERT's special tokens
  return tokenizer


def encode(tokenizer: tokenizers.Tokenizer, texts: list[str],
           max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids int32 [N, max_len] ([CLS] ... [SEP], then [PAD]) and mask int32 [N, max_len]
  (1 on real tokens). Longer texts are cut to max_len with [SEP] kept as the last token."""
  if max_len < 2:
    raise ValueError(f"max_len={max_len} must hold at least [CLS] and [SEP]")
  special = special_ids(tokenizer)
  ids = np.full((len(texts), max_len), special.pad, np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for row, encoding in enumerate(tokenizer.encode_batch(texts)):
    tokens = encoding.ids
    if len(tokens) > max_len:
      tokens = tokens[:max_len - 1] + [special.sep]
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask
