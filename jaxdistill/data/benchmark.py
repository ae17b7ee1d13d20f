"""The bundled benchmark (config.data.name = "fashion_grid"), ready for a run: splits, the
tokenizer (built from the captions or a pretrained one, config.data.tokenizer; saved in the
workdir, so the export and a resumed run use the same vocabulary) and token ids of every caption.
`Benchmark` answers what the trainer, the evaluator and the teacher cache ask of a dataset
(`train_dataset`, `num_train`, `eval_split`, `train_sample`), as data/real/dataset.py's
`RealData` does for real data."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping

import ml_collections
import numpy as np
import tokenizers

from jaxdistill.data import pipeline
from jaxdistill.data.compositional import CompositionalSplit, build_benchmark
from jaxdistill.data.eval_split import EvalSplit
from jaxdistill.data.negatives import training_negatives
from jaxdistill.data.fashion_mnist import load_fashion_mnist
from jaxdistill.data.unpaired import SPLIT as UNPAIRED, build_unpaired_pool
from jaxdistill.data.tokenizer import (Vocabulary, build_tokenizer, encode,
                                       load_pretrained_tokenizer, load_tokenizer, save_tokenizer)

TOKENIZER_FILE = "tokenizer.json"
NAME = "fashion_grid"


@dataclasses.dataclass(frozen=True)
class Benchmark(Vocabulary):
  """splits: train / val / test. tokens[split] = (ids int32 [N,5,L], mask int32 [N,5,L]).
  probe_tokens[split] = (true_ids, true_mask, false_ids, false_mask), each int32 [N,L]."""
  splits: dict[str, CompositionalSplit]
  tokenizer: tokenizers.Tokenizer
  tokens: dict[str, tuple[np.ndarray, np.ndarray]]
  probe_tokens: dict[str, tuple[np.ndarray, ...]]

  dataset = "compositional"   # reports' dataset name

  def num_train(self, split: str) -> int:
    return len(self.splits[split].image_ids)

  def fill_model_inputs(self, config: ml_collections.ConfigDict) -> None:
    """config.model.vocab_size from the tokenizer (the model's image fields are the benchmark's)."""
    config.model.vocab_size = self.vocab_size

  def train_dataset(self, config: ml_collections.ConfigDict, split: str, *, process_index: int,
                    process_count: int, texts: Mapping[str, Callable] | None = None):
    """data/pipeline.py's stream of `split` (batches of whole look-alike groups), with the mined
    hard negatives of config.mining.bank_dir when the recipe asks for them. texts {name:
    tokenize(texts) -> (ids, mask)}: every caption also in that vocabulary, as
    <name>_text_ids / <name>_text_mask."""
    ids, mask = self.tokens[split]
    captions = self.splits[split].captions
    flat = [c for caps in captions for c in caps]
    extra = {}
    for name, tokenize in (texts or {}).items():
      t_ids, t_mask = tokenize(flat)
      extra[name] = (t_ids.reshape(len(captions), -1, t_ids.shape[-1]),
                     t_mask.reshape(len(captions), -1, t_mask.shape[-1]))
    negatives = training_negatives(config, self.splits[split].image_ids, ids.shape[1])
    return pipeline.train_dataset(
        self.splits[split], ids, mask, global_batch_size=config.batch_size,
        group_size=config.data.group_size, seed=config.seed, process_index=process_index,
        process_count=process_count, negatives=negatives, extra_tokens=extra)

  def eval_split(self, split: str) -> EvalSplit:
    data = self.splits[split]
    arrays = pipeline.eval_arrays(data, *self.tokens[split])
    per_image = self.tokens[split][0].shape[1]
    return EvalSplit(name=split, dataset=f"{self.dataset}_{split}", images=arrays["image"],
                     image_ids=np.asarray(data.image_ids), captions=list(data.captions),
                     text_ids=arrays["text_ids"], text_mask=arrays["text_mask"],
                     caption_to_image=arrays["caption_to_image"],
                     caption_index=np.tile(np.arange(per_image, dtype=np.int32), len(data.captions)),
                     probe=self.probe_tokens[split])

  def train_sample(self, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The first caption of the first n train images: (texts, ids [n, L], mask [n, L])."""
    ids, mask = self.tokens["train"]
    n = min(n, len(ids))
    return [self.splits["train"].captions[i][0] for i in range(n)], ids[:n, 0], mask[:n, 0]


def prepare_benchmark(config: ml_collections.ConfigDict, workdir: str | None) -> Benchmark:
  """Generates the splits from config.data (plus the "unpaired" pool of data/unpaired.py when
  config.data.num_unpaired > 0, a key only Leaner-and-Faster's configs set), and loads the
  workdir's tokenizer, else reads config.data.tokenizer (a pretrained one) or builds one from the
  train captions, and saves it in the workdir."""
  d = config.data
  fmnist = load_fashion_mnist(d.fashion_mnist_dir or None)
  splits = build_benchmark(fmnist, seed=d.seed, num_train=d.num_train, num_val=d.num_val,
                           num_test=d.num_test, group_size=d.group_size,
                           swap_fraction=d.swap_fraction)
  if d.get("num_unpaired", 0) > 0:
    splits[UNPAIRED] = build_unpaired_pool(fmnist, splits, seed=d.seed, num=d.num_unpaired,
                                           group_size=d.group_size)
  path = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
  if path and os.path.exists(path):
    tokenizer = load_tokenizer(path)
  else:
    if d.get("tokenizer", ""):   # configs saved before the field existed lack it
      tokenizer = load_pretrained_tokenizer(d.tokenizer)
    else:
      train = splits["train"]
      texts = [c for caps in train.captions for c in caps] + list(train.probe_false)
      tokenizer = build_tokenizer(texts, vocab_size=d.vocab_size)
    if path:
      save_tokenizer(tokenizer, path)
  max_len = config.model.max_len
  tokens, probe_tokens = {}, {}
  for name, split in splits.items():
    n, per_image = len(split.captions), len(split.captions[0])
    ids, mask = encode(tokenizer, [c for caps in split.captions for c in caps], max_len)
    tokens[name] = (ids.reshape(n, per_image, max_len), mask.reshape(n, per_image, max_len))
    probe_tokens[name] = (*encode(tokenizer, list(split.probe_true), max_len),
                          *encode(tokenizer, list(split.probe_false), max_len))
  return Benchmark(splits=splits, tokenizer=tokenizer, tokens=tokens, probe_tokens=probe_tokens)
