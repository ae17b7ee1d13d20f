"""A real dataset ready for a run, chosen by config.data.name (the bundled benchmark is
data/benchmark.py's "fashion_grid"):

  karpathy_json  Karpathy's dataset_*.json + the image folder (data.karpathy_json, data.image_root)
  coco           the same with dataset_coco.json; its 5,000-image test split is also scored on
                 the five 1K folds ("1k" beside the 5K figures)
  flickr30k      the same with dataset_flickr30k.json (train 29,000 / val 1,014 / test 1,000)
  tfds           tensorflow-datasets `data.tfds_name` (coco_captions) prepared as ArrayRecord
                 under data.tfds_dir
  webdataset     tar shards, one pattern per split: data.shards.train / .val / .test
With data.train_split = "unpaired" (Leaner-and-Faster's stage 1) any of them trains on
data.unpaired_images (a folder or shards) and data.unpaired_texts (a text file or shards) read
apart.

`RealData` answers what the trainer, the evaluator and the teacher cache ask (`train_dataset`,
`num_train`, `eval_split`, `train_sample`), as `Benchmark` does for the bundled data. Images are
decoded on the host (data/real/pipeline.py): training at data.image_size with RandomResizedCrop
(scale data.crop_scale) + flip, evaluation resized and centre-cropped, both normalised with
data.image_mean / image_std, or with the sizes, constants and resampling of data.preprocessor
(a checkpoint's preprocessor_config.json, e.g. the teacher's), which then replaces those four. Captions are
tokenized with the student's tokenizer (data.tokenizer, or a WordPiece vocabulary built from the
Karpathy train captions and kept in the workdir).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import threading
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import numpy as np
import tokenizers

from jaxdistill.data.eval_split import EvalSplit
from jaxdistill.data.real import pipeline
from jaxdistill.data.real.corpora import ImageFolder, TextCorpus
from jaxdistill.data.real.image_ops import BadImage, ImageSpec, eval_image
from jaxdistill.data.real.karpathy import FOLD_IMAGES, NUM_FOLDS, KarpathyDataset, load_karpathy
from jaxdistill.data.real.records import DataError, PairedRecord
from jaxdistill.data.real.text import FunctionEncoder, TextEncoder
from jaxdistill.data.real.webdataset import count_samples, iter_tar, list_shards, sample_to_record
from jaxdistill.data.tokenizer import (Vocabulary, build_tokenizer, load_pretrained_tokenizer,
                                       load_tokenizer, save_tokenizer)

KARPATHY = ("karpathy_json", "coco", "flickr30k")
UNPAIRED = "unpaired"   # data.train_split of paper 000's stage 1 (data.unpaired_images / _texts)
NAMES = KARPATHY + ("tfds", "webdataset")
TOKENIZER_FILE = "tokenizer.json"
_EXPECTED_DATASET = {"coco": "coco", "flickr30k": "flickr30k"}


class LazyImages:
  """The images of a random-access source as an [N, S, S, 3] float32 array-like that decodes
  (resize + centre crop, normalised: `eval_image`) only the rows it is sliced for, on
  `num_threads` threads. An image that is missing or does not decode comes back as zeros and
  is recorded in `failures` {row: reason}."""

  def __init__(self, source: Sequence[PairedRecord], spec: ImageSpec, num_threads: int = 4):
    self.source, self.spec = source, spec
    self.shape = (len(source), spec.size, spec.size, 3)
    self.ndim, self.dtype = 4, np.dtype(np.float32)
    self.failures: dict[int, str] = {}
    self._lock = threading.Lock()
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None

  def __len__(self) -> int:
    return self.shape[0]

  def _row(self, row: int) -> np.ndarray:
    record = self.source[row]
    try:
      if record.error is not None:
        raise BadImage(record.error if record.error == "missing" else "corrupt", record.key)
      return eval_image(record.image, self.spec)
    except BadImage as e:
      with self._lock:
        self.failures[row] = e.reason
      return np.zeros(self.shape[1:], np.float32)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      return self._row(int(index) % len(self))
    rows = np.arange(len(self))[index]
    flat = rows.reshape(-1).tolist()
    decoded = list(self._pool.map(self._row, flat) if self._pool else map(self._row, flat))
    out = np.stack(decoded) if decoded else np.zeros((0, *self.shape[1:]), np.float32)
    return out.reshape(*rows.shape, *self.shape[1:])


def _is_shards(path: str) -> bool:
  """Whether an unpaired corpus path names webdataset shards (a .tar, a brace or glob pattern)
  rather than an image folder or a text file."""
  return path.endswith(".tar") or "{" in path or "*" in path


def image_spec(config: ml_collections.ConfigDict) -> ImageSpec:
  """The data section's ImageSpec: data.preprocessor's (its crop size, resize, constants and
  resampling), else data.image_size / image_resize / image_mean / image_std."""
  d = config.data
  if d.preprocessor:
    return ImageSpec.from_preprocessor_config(d.preprocessor)
  return ImageSpec(size=d.image_size, resize=d.image_resize, mean=tuple(d.image_mean),
                   std=tuple(d.image_std))


class _ShardRecords(Sequence):
  """Every sample of a (small) webdataset evaluation split, read once into memory."""

  def __init__(self, pattern: str, split: str):
    self.records = [sample_to_record(s, split) for shard in list_shards(pattern)
                    for s in iter_tar(shard)]
    if not self.records:
      raise DataError(f"--config.data.shards.{split}={pattern!r} holds no sample")
    self.captions = [r.captions for r in self.records]

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> PairedRecord:
    return self.records[index]


class RealData(Vocabulary):
  """config.data.name in NAMES (module docstring). tokenizer: the student's; image: ImageSpec."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None):
    d = config.data
    if d.name not in NAMES:
      raise DataError(f"--config.data.name={d.name!r} is not a real dataset: use one of "
                      f"{', '.join(NAMES)} (or fashion_grid, the bundled benchmark)")
    self.name, self.config = d.name, config
    self.image = image_spec(config)
    self._karpathy: KarpathyDataset | None = None
    if d.name in KARPATHY:
      self._karpathy = load_karpathy(d.karpathy_json, d.image_root, max_captions=d.max_captions)
      expected = _EXPECTED_DATASET.get(d.name)
      if expected and self._karpathy.dataset != expected:
        raise DataError(f"--config.data.name={d.name} but {d.karpathy_json} is a "
                        f"{self._karpathy.dataset or 'unnamed'} dataset: point "
                        f"--config.data.karpathy_json at dataset_{expected}.json, or use "
                        "--config.data.name=karpathy_json")
    self.dataset = self._karpathy.dataset if self._karpathy and self._karpathy.dataset else (
        d.tfds_name if d.name == "tfds" else d.name)
    self.tokenizer = self._load_tokenizer(workdir)
    self.text = TextEncoder(self.tokenizer, config.model.max_len)
    self._sources: dict[str, Sequence[PairedRecord]] = {}

  # ---------------------------------------------------------------- vocabulary
  def _load_tokenizer(self, workdir: str | None) -> tokenizers.Tokenizer:
    d = self.config.data
    path = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
    if path and os.path.exists(path):
      return load_tokenizer(path)
    if d.tokenizer:
      tokenizer = load_pretrained_tokenizer(d.tokenizer)
    elif self._karpathy is not None:
      train = self._karpathy.split(self.train_split)
      tokenizer = build_tokenizer([c for caps in train.captions for c in caps if c.strip()],
                                  vocab_size=d.vocab_size)
    else:
      raise DataError(f"--config.data.name={d.name} needs --config.data.tokenizer (a "
                      "tokenizer.json or a checkpoint directory holding one, e.g. the student "
                      "text tower's): only Karpathy JSONs list their captions up front to build "
                      "a vocabulary from")
    if path:
      save_tokenizer(tokenizer, path)
    return tokenizer

  # ---------------------------------------------------------------- splits
  @property
  def train_split(self) -> str:
    """The paired training split: data.train_split, default (and under "unpaired", which trains
    on the unpaired corpora) "train+restval" where the Karpathy JSON has restval images."""
    split = self.config.data.train_split
    split = "" if split == UNPAIRED else split
    if split in ("", "train") and self._karpathy is not None and self._karpathy.sizes.get("restval"):
      return "train+restval" if split == "" else split
    return split or ("train+restval" if self.name == "tfds" else "train")

  def _resolve(self, split: str) -> str:
    return self.train_split if split == "train" else split

  def source(self, split: str) -> Sequence[PairedRecord]:
    """Random-access records of `split` ("train" means data.train_split)."""
    split = self._resolve(split)
    if split not in self._sources:
      d = self.config.data
      if self._karpathy is not None:
        self._sources[split] = self._karpathy.split(split)
      elif self.name == "tfds":
        from jaxdistill.data.real.tfds_source import load_tfds   # imports TensorFlow: only here
        self._sources[split] = load_tfds(d.tfds_name, split, data_dir=d.tfds_dir or None,
                                         max_captions=d.max_captions)
      else:
        self._sources[split] = _ShardRecords(self._shards(split), split)
    return self._sources[split]

  def _shards(self, split: str) -> str:
    pattern = self.config.data.shards.get(split, "")
    if not pattern:
      raise DataError(f"--config.data.name=webdataset has no shards for split {split!r}: set "
                      f"--config.data.shards.{split}=PATTERN (e.g. /data/cc3m/{{00000..00331}}.tar)")
    return pattern

  def num_train(self, split: str) -> int:
    if split == UNPAIRED:   # an epoch: one pass over the unpaired images
      path = self.config.data.unpaired_images
      return count_samples(list_shards(path)) if _is_shards(path) else len(ImageFolder(path))
    if self.name == "webdataset":
      return count_samples(list_shards(self._shards(self._resolve(split))))
    return len(self.source(split))

  def fill_model_inputs(self, config: ml_collections.ConfigDict) -> None:
    """config.model's input fields from what the pipeline feeds: vocab_size, image_size,
    channels 3, image_mean / image_std (the normalisation towers that adapt images undo)."""
    m, spec = config.model, self.image
    m.vocab_size, m.image_size, m.channels = self.vocab_size, spec.size, 3
    for key, value in (("image_mean", spec.mean), ("image_std", spec.std)):
      del m[key]   # the benchmark's float becomes a per-channel tuple (ConfigDict keeps types)
      m[key] = tuple(float(v) for v in value)

  def train_dataset(self, config: ml_collections.ConfigDict, split: str, *, process_index: int,
                    process_count: int, texts: Mapping[str, Callable] | None = None):
    """The grain training stream of `split` (data/real/pipeline.py; batches of this process's
    rows, with their skip counts under "stats"). texts {name: tokenize(texts) -> (ids, mask)}:
    each caption also in that vocabulary (a teacher's own), as <name>_text_ids / _text_mask."""
    section = config.get(config.get("method", ""), None)
    if section is not None and section.get("hard_negatives", 0) > 0:
      raise DataError(f"--config.{config.method}.hard_negatives={section.hard_negatives}: mined "
                      "hard negatives are read for the bundled benchmark only; set it to 0 on "
                      "real data")
    d = config.data
    transform = pipeline.TrainTransform(image=self.image, scale=tuple(d.crop_scale))
    encoders = {"": self.text, **{name: FunctionEncoder(fn) for name, fn in (texts or {}).items()}}
    common = dict(global_batch_size=config.batch_size, seed=config.seed, text=encoders,
                  transform=transform, process_index=process_index, process_count=process_count,
                  num_threads=d.num_threads)
    if split == UNPAIRED:
      return self._unpaired_dataset(common)
    if self.name == "webdataset":
      return pipeline.stream_train_dataset(self._shards(self._resolve(split)), **common)
    return pipeline.train_dataset(self.source(split), **common)

  def _unpaired_dataset(self, common: dict) -> pipeline.ZipBatches:
    """Paper 000's stage-1 pool: images alone (data.unpaired_images: a folder or shards) and
    captions alone (data.unpaired_texts: a text file or shards), read apart and zipped into one
    batch: image / image_id from the first, text_ids / text_mask / caption_index from the second
    (their pairing means nothing)."""
    d = self.config.data
    if not d.unpaired_images or not d.unpaired_texts:
      raise DataError("--config.data.train_split=unpaired on real data needs "
                      "--config.data.unpaired_images (an image folder or webdataset shards) and "
                      "--config.data.unpaired_texts (a text file, one caption per line, or shards)")
    streams = {}
    for fields, path, corpus in (("image", d.unpaired_images, ImageFolder),
                                 ("text", d.unpaired_texts, TextCorpus)):
      kwargs = dict(common, transform=dataclasses.replace(common["transform"], fields=fields))
      if _is_shards(path):
        streams[fields] = pipeline.stream_train_dataset(path, **kwargs)
      else:
        streams[fields] = pipeline.train_dataset(corpus(path), **kwargs)
    return pipeline.ZipBatches(streams["image"], streams["text"])

  def eval_split(self, split: str, image: ImageSpec | None = None) -> EvalSplit:
    """Every image of `split` (decoded lazily, with `image` or the data's ImageSpec) and every
    non-empty caption, tokenized."""
    source = self.source(split)
    fields, skipped = pipeline.eval_texts(source, self.text)
    ids = getattr(source, "image_ids", None)
    image_ids = (np.asarray(ids, np.int64) if ids is not None
                 else np.asarray([source[i].image_id for i in range(len(source))], np.int64))
    listed = getattr(source, "captions", None)
    captions = list(listed) if listed is not None else [source[i].captions for i in range(len(source))]
    folds = {}
    if self._karpathy is not None and self._resolve(split) == "test" and self._karpathy.has_folds:
      folds["1k"] = [np.arange(f * FOLD_IMAGES, (f + 1) * FOLD_IMAGES) for f in range(NUM_FOLDS)]
    return EvalSplit(name=split, dataset=f"{self.dataset}_{self._resolve(split)}",
                     images=LazyImages(source, image or self.image, self.config.data.num_threads),
                     image_ids=image_ids, captions=captions, text_ids=fields["text_ids"],
                     text_mask=fields["text_mask"], caption_to_image=fields["caption_to_index"],
                     caption_index=fields["caption_index"], folds=folds, skipped=skipped)

  def train_sample(self, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The first non-empty caption of the first train records (n at most)."""
    if self.name == "webdataset":   # the first samples of the first shard, not every shard
      first = list_shards(self._shards(self._resolve("train")))[0]
      records = (sample_to_record(s) for s in iter_tar(first))
    else:
      source = self.source("train")
      records = (source[i] for i in range(len(source)))
    texts = []
    for record in itertools.islice(records, 4 * n):
      caption = next((c for c in record.captions if c.strip()), None)
      if caption is not None:
        texts.append(caption)
      if len(texts) == n:
        break
    ids, mask = self.text.encode(texts)
    return texts, ids, mask

