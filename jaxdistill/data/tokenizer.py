"""The text tokenizer: a BERT-style WordPiece vocabulary (Devlin et al. 2019) trained on the
benchmark's captions with the `tokenizers` library, its (atomic) saving and loading, and encoding
to fixed-length id / mask arrays."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))


def build_tokenizer(texts: list[str], vocab_size: int = 256) -> tokenizers.Tokenizer:
  """Trains a lowercasing WordPiece tokenizer on `texts`; encodings are [CLS] ... [SEP].

  The vocabulary holds the special tokens first (PAD_ID..MASK_ID = 0..4), then at most
  vocab_size - 5 pieces (fewer when the texts need fewer)."""
  if vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special "
                     "tokens; raise --config.data.vocab_size")
  tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
  for token_id, token in enumerate(SPECIAL_TOKENS):
    assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
  return tokenizer


def save_tokenizer(tokenizer: tokenizers.Tokenizer, path: str) -> None:
  """Writes the tokenizer JSON to `path` via a temporary file and a rename (never half-written)."""
  directory = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".tokenizer-", suffix=".tmp",
                                   delete=False, encoding="utf-8") as f:
    f.write(tokenizer.to_str())
  os.replace(f.name, path)


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Reads a tokenizer written by save_tokenizer."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist: it is written by the first "
                            "run in a workdir; point at that workdir or delete the run to rebuild")
  return tokenizers.Tokenizer.from_file(path)


def encode(tokenizer: tokenizers.Tokenizer, texts: list[str],
           max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids int32 [N, max_len] ([CLS] ... [SEP], then PAD_ID) and mask int32 [N, max_len]
  (1 on real tokens). Longer texts are cut to max_len with [SEP] kept as the last token."""
  if max_len < 2:
    raise ValueError(f"max_len={max_len} must hold at least [CLS] and [SEP]")
  ids = np.full((len(texts), max_len), PAD_ID, np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for row, encoding in enumerate(tokenizer.encode_batch(texts)):
    tokens = encoding.ids
    if len(tokens) > max_len:
      tokens = tokens[:max_len - 1] + [SEP_ID]
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask
