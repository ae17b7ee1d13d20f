"""A teacher's or student's own tokenizer (the `tokenizers` tokenizer.json of its checkpoint:
WordPiece for BERT / MiniLM, byte-level BPE for CLIP) encoding captions to fixed-length arrays.
Unlike data/tokenizer.py's `encode` it needs no BERT special tokens: the tokenizer's own
post-processor adds its start / end tokens, and the pad id comes from the tokenizer."""

from __future__ import annotations

import os

import numpy as np
import tokenizers

from jaxdistill.data.real.records import DataError

_PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>")   # BERT, T5 / SentencePiece, CLIP


class TextEncoder:
  """encode(texts) -> ids int32 [N, max_len], mask int32 [N, max_len] (1 on real tokens).

  Texts longer than max_len are cut to max_len keeping their last token when it is a special
  one (BERT's [SEP], CLIP's <|endoftext|>), so a truncated caption still ends like a whole one.
  pad_id: given, else the tokenizer's padding id, else the first of [PAD] / <pad> /
  <|endoftext|> in its vocabulary."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_len: int, pad_id: int | None = None):
    if max_len < 2:
      raise ValueError(f"max_len={max_len} must hold at least a start and an end token")
    self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    if pad_id is None and tokenizer.padding is not None:
      pad_id = tokenizer.padding.get("pad_id")
    if pad_id is None:
      pad_id = next((i for t in _PAD_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None)
    if pad_id is None:
      raise DataError(f"the tokenizer has no padding id and none of {', '.join(_PAD_TOKENS)}: "
                      "pass pad_id explicitly")
    self.max_len, self.pad_id = max_len, int(pad_id)

  @classmethod
  def from_file(cls, path: str, max_len: int, pad_id: int | None = None) -> "TextEncoder":
    """`path`: a tokenizer.json or a checkpoint directory holding one."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise DataError(f"tokenizer {file} does not exist: point at the checkpoint's tokenizer.json "
                      "or its directory (save a Hugging Face tokenizer with save_pretrained)")
    try:
      tokenizer = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise DataError(f"{file} is not a `tokenizers` tokenizer.json ({e})") from e
    return cls(tokenizer, max_len, pad_id)

  def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_len), np.int32)
    for row, encoding in enumerate(self.tokenizer.encode_batch(list(texts))):
      tokens = encoding.ids
      if len(tokens) > self.max_len:
        keep_last = encoding.special_tokens_mask[-1] == 1
        tokens = tokens[:self.max_len - 1] + [tokens[-1]] if keep_last else tokens[:self.max_len]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


class FunctionEncoder:
  """A tokenize(texts) -> (ids int32 [N, L], mask int32 [N, L]) function (e.g. a teacher's
  Teacher.tokenize) where the pipeline takes a TextEncoder."""

  def __init__(self, tokenize):
    self.encode = tokenize
