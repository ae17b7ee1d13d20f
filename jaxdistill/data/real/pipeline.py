"""grain pipelines over real data: the training streams (random-access sources and webdataset
shards), the evaluation image batches and the evaluation captions.

Training batches (this process's b = global_batch_size // process_count rows):
  image        float32 [b, S, S, 3] normalised (uint8 with normalize=False)   fields paired / image
  text_ids     int32 [b, L], text_mask int32 [b, L]                           fields paired / text
  <name>_text_ids / <name>_text_mask for every further tokenizer of `text` (a {name: TextEncoder}
               mapping; the name "" gives text_ids / text_mask)
  image_id     int32 [b]; caption_index int32 [b] (which caption of the image was taken)
  stats        {"missing": int, "corrupt": int, "no_caption": int}: items skipped while filling
               this batch (sum them over steps for the run's totals; `pop_stats` takes them off)
An item whose image file is missing or does not decode, or that has no non-empty caption, is
dropped and counted, never raised; the batch is filled from the next items. Only a run of
max_consecutive_skips bad items in a row (a wrong image root, say) raises DataError.

Randomness: example i of epoch e draws its caption (uniformly among its non-empty ones, once per
epoch), crop and flip from numpy's default_rng([seed, e, i]) (shards: [seed, e, shard, sample]),
so batches depend on the seed alone, not on threads. Random-access order: epoch e is grain's
index_shuffle permutation seeded seed + e; global stream position k goes to process k % n, so
the processes read disjoint items that together cover each epoch once. Webdataset order: see
webdataset.py (each process its own shards). Iterators support get_state() / set_state(): the
state is the position in the item stream after the last batch returned."""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxdistill.data.real.image_ops import BadImage, ImageSpec, eval_image, train_image
from jaxdistill.data.real.records import DataError, PairedRecord
from jaxdistill.data.real.text import TextEncoder
from jaxdistill.data.real.webdataset import ShardSample, ShardStream, list_shards

SKIP_REASONS = ("missing", "corrupt", "no_caption")
FIELDS = ("paired", "image", "text")
STATS = "stats"
_LOGGED_SKIPS = 10          # skips logged per iterator, with their file / key

TextArg = TextEncoder | Mapping[str, TextEncoder] | None


@dataclasses.dataclass(frozen=True)
class _Skip:
  reason: str
  detail: str


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """What a training example needs: fields ("paired", "image": images alone, "text": captions
  alone), the ImageSpec, RandomResizedCrop scale / ratio, flip, normalize (see image_ops)."""
  image: ImageSpec = ImageSpec()
  fields: str = "paired"
  scale: tuple[float, float] = (0.9, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  normalize: bool = True

  def __post_init__(self):
    if self.fields not in FIELDS:
      raise ValueError(f"fields={self.fields!r} must be one of {', '.join(FIELDS)}")
    if not 0 < self.scale[0] <= self.scale[1] <= 1:
      raise ValueError(f"scale={self.scale} must satisfy 0 < low <= high <= 1")


def _encoders(text: TextArg, fields: str) -> dict[str, TextEncoder]:
  if fields == "image":
    return {}
  if text is None:
    raise ValueError(f"fields={fields!r} reads captions: pass text= (a TextEncoder or a "
                     "{name: TextEncoder} mapping)")
  return {"": text} if isinstance(text, TextEncoder) else dict(text)


def text_fields(encoders: Mapping[str, TextEncoder], captions: Sequence[str]
                ) -> dict[str, np.ndarray]:
  """{prefix + "text_ids": int32 [N, L], prefix + "text_mask": int32 [N, L]} for each encoder,
  prefix "" for the name "" and "<name>_" otherwise."""
  out = {}
  for name, encoder in encoders.items():
    ids, mask = encoder.encode(list(captions))
    prefix = f"{name}_" if name else ""
    out[f"{prefix}text_ids"], out[f"{prefix}text_mask"] = ids, mask
  return out


def pop_stats(batch: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """(the batch's arrays, its skip counts): what goes to the device, what goes to the metrics."""
  arrays = dict(batch)
  return arrays, arrays.pop(STATS)


def train_example(record: PairedRecord, rng: np.random.Generator,
                  transform: TrainTransform) -> dict[str, Any] | _Skip:
  """One training example (unbatched; "caption" still a string) or the reason it is skipped."""
  if record.error is not None:
    return _Skip(record.error if record.error in SKIP_REASONS else "corrupt", record.key)
  out: dict[str, Any] = {"image_id": np.int32(record.image_id)}
  if transform.fields != "image":
    usable = [i for i, caption in enumerate(record.captions) if caption.strip()]
    if not usable:
      return _Skip("no_caption", record.key)
    choice = usable[int(rng.integers(len(usable)))]
    out["caption"] = record.captions[choice]
    out["caption_index"] = np.int32(choice)
  if transform.fields != "text":
    try:
      out["image"] = train_image(record.image, transform.image, rng, scale=transform.scale,
                                 ratio=transform.ratio, flip=transform.flip,
                                 normalize=transform.normalize)
    except BadImage as e:
      return _Skip(e.reason, e.detail if isinstance(record.image, str) else
                   f"{record.key}: {e.detail}")
  return out


class _DropAndBatch(grain.IterDataset):
  """Batches of `batch_size` good examples from a stream of work items: load(item) -> example
  or _Skip, run on `num_threads` threads; skips are dropped and counted in batch["stats"].
  prefetch: the next batch is made on a background thread while the caller uses this one."""

  def __init__(self, parent: grain.IterDataset, load: Callable[[Any], dict | _Skip], *,
               batch_size: int, encoders: Mapping[str, TextEncoder], num_threads: int,
               prefetch: bool, max_consecutive_skips: int):
    super().__init__(parent)
    self.load, self.batch_size, self.encoders = load, batch_size, encoders
    self.num_threads, self.prefetch = num_threads, prefetch
    self.max_consecutive_skips = max_consecutive_skips

  def __iter__(self) -> "_DropAndBatchIterator":
    return _DropAndBatchIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return (f"DropAndBatch(batch_size={self.batch_size}, num_threads={self.num_threads}, "
            f"prefetch={self.prefetch})")


class _DropAndBatchIterator(grain.DatasetIterator):
  """State: the parent's state after the items of the last batch returned (a prefetched batch
  is not part of it; set_state drops it). The worker threads are not daemons: at interpreter
  exit they finish the batch in flight and stop (grain's daemon-thread prefetch can abort the
  process there)."""

  def __init__(self, parent: grain.DatasetIterator, spec: _DropAndBatch):
    super().__init__(parent)
    self._spec = spec
    self._pool = (concurrent.futures.ThreadPoolExecutor(spec.num_threads)
                  if spec.num_threads > 1 else None)
    self._producer = concurrent.futures.ThreadPoolExecutor(1) if spec.prefetch else None
    self._next: concurrent.futures.Future | None = None
    self._state = copy.deepcopy(parent.get_state())
    self._streak = 0        # consecutive skipped items
    self._logged = 0

  def _skip(self, skip: _Skip, counts: dict[str, int]) -> None:
    counts[skip.reason] += 1
    self._streak += 1
    if self._logged < _LOGGED_SKIPS:
      self._logged += 1
      logging.warning("skipping a training item (%s): %s", skip.reason, skip.detail)
    if self._streak >= self._spec.max_consecutive_skips:
      raise DataError(f"{self._streak} training items in a row were unusable (last: "
                      f"{skip.reason}, {skip.detail}); check the image root / shard paths and "
                      "the caption field")

  def _make(self) -> tuple[dict[str, Any] | None, Any]:
    """(the next batch, or None at the end of a finite stream; the parent's state after it)."""
    spec = self._spec
    good: list[dict[str, Any]] = []
    counts = dict.fromkeys(SKIP_REASONS, 0)
    while len(good) < spec.batch_size:
      work = list(itertools.islice(self._parent, spec.batch_size - len(good)))
      if not work:   # a finite stream: its last partial batch is dropped
        return None, copy.deepcopy(self._parent.get_state())
      results = self._pool.map(spec.load, work) if self._pool else map(spec.load, work)
      for result in results:
        if isinstance(result, _Skip):
          self._skip(result, counts)
        else:
          self._streak = 0
          good.append(result)
    batch = {k: np.stack([g[k] for g in good]) for k in good[0] if k != "caption"}
    if "caption" in good[0]:
      batch.update(text_fields(spec.encoders, [g["caption"] for g in good]))
    batch[STATS] = counts
    return batch, copy.deepcopy(self._parent.get_state())

  def __next__(self) -> dict[str, Any]:
    if self._producer is None:
      batch, state = self._make()
    else:
      future = self._next or self._producer.submit(self._make)
      self._next = None
      batch, state = future.result()
      if batch is not None:
        self._next = self._producer.submit(self._make)
    if batch is None:
      raise StopIteration
    self._state = state
    return batch

  def _drop_prefetched(self) -> None:
    if self._next is not None:
      if not self._next.cancel():
        concurrent.futures.wait([self._next])
      self._next = None

  def get_state(self) -> dict[str, Any]:
    return copy.deepcopy(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self._drop_prefetched()
    self._parent.set_state(state)
    self._state = copy.deepcopy(state)


def _local_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
  return global_batch_size // process_count


def train_order(num_items: int, seed: int, process_index: int = 0,
                process_count: int = 1) -> grain.MapDataset:
  """This process's infinite stream of (item index, epoch): the global stream is epoch after
  epoch of a permutation of the items (index_shuffle seeded seed + epoch); process p takes its
  positions p, p + n, ..."""
  if num_items < 1:
    raise DataError("the training source is empty")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must lie in [0, 2**32)")
  order = grain.MapDataset.range(num_items).shuffle(seed=seed).repeat()
  order = order.map_with_index(lambda k, i: (int(i), k // num_items))
  return order[process_index::process_count]


def train_dataset(source: Sequence[PairedRecord], *, global_batch_size: int, seed: int,
                  text: TextArg = None, transform: TrainTransform = TrainTransform(),
                  process_index: int = 0, process_count: int = 1, num_threads: int = 4,
                  prefetch: bool = True, max_consecutive_skips: int = 1000) -> grain.IterDataset:
  """Infinite training stream over a random-access source (Karpathy split, tfds source,
  ImageFolder, TextCorpus), batches as in the module docstring."""
  local = _local_batch(global_batch_size, process_index, process_count)
  encoders = _encoders(text, transform.fields)

  def load(work: tuple[int, int]) -> dict | _Skip:
    index, epoch = work
    return train_example(source[index], np.random.default_rng([seed, epoch, index]), transform)

  order = train_order(len(source), seed, process_index, process_count)
  work = order.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return _DropAndBatch(work, load, batch_size=local, encoders=encoders, num_threads=num_threads,
                       prefetch=prefetch, max_consecutive_skips=max_consecutive_skips)


def stream_train_dataset(shards: str | Sequence[str], *, global_batch_size: int, seed: int,
                         text: TextArg = None, transform: TrainTransform = TrainTransform(),
                         process_index: int = 0, process_count: int = 1,
                         num_epochs: int | None = None, num_threads: int = 4, prefetch: bool = True,
                         max_consecutive_skips: int = 1000) -> grain.IterDataset:
  """Training stream over webdataset shards (a brace / glob pattern or the list): this process
  reads its own shards (webdataset.shards_for_process); num_epochs None repeats forever (a
  finite stream drops its last partial batch). Batches as in the module docstring; fields
  "image" / "text" read one modality of the same shards (paper 000's stage-1 corpora)."""
  local = _local_batch(global_batch_size, process_index, process_count)
  encoders = _encoders(text, transform.fields)
  shard_list = list_shards(shards)
  stream = ShardStream(shard_list, seed=seed, process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs)

  def load(sample: ShardSample) -> dict | _Skip:
    rng = np.random.default_rng([seed, sample.epoch, sample.shard, sample.index])
    return train_example(sample.record, rng, transform)

  return _DropAndBatch(stream, load, batch_size=local, encoders=encoders, num_threads=num_threads,
                       prefetch=prefetch, max_consecutive_skips=max_consecutive_skips)


def eval_dataset(source: Sequence[PairedRecord], *, batch_size: int, image: ImageSpec,
                 process_index: int = 0, process_count: int = 1, normalize: bool = True,
                 num_threads: int = 4) -> grain.IterDataset:
  """Every image of the source once, resized and centre-cropped: process p takes items p, p + n,
  ... in batches of `batch_size`, and every process gets the same number of batches
  (ceil(ceil(N / n) / batch_size)), so multi-host evaluation steps stay in lockstep. Rows:
  image [b, S, S, 3], image_id int32 [b], index int32 [b] (position in the source, -1 on
  padding), valid int32 [b] (0 on padding and on skipped images, whose pixels are zeros);
  stats {"missing", "corrupt"}: images skipped in this batch."""
  if batch_size < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"batch_size={batch_size} must be >= 1 and process_index={process_index} "
                     f"in [0, {process_count})")
  n = len(source)
  per_process = math.ceil(n / process_count)
  num_batches = math.ceil(per_process / batch_size)
  blank = np.zeros((image.size, image.size, 3), np.float32 if normalize else np.uint8)

  def load(j: int) -> dict[str, Any]:
    index = process_index + j * process_count
    row = {"image": blank, "image_id": np.int32(-1), "index": np.int32(-1), "valid": np.int32(0),
           "skip": ""}
    if j >= per_process or index >= n:
      return row
    record = source[index]
    row["index"] = np.int32(index)
    if record.error is not None:
      row["skip"] = record.error if record.error in SKIP_REASONS else "corrupt"
      return row
    try:
      row["image"] = eval_image(record.image, image, normalize)
    except BadImage as e:
      logging.warning("skipping an evaluation image (%s): %s", e.reason, e.detail)
      row["skip"] = e.reason
      return row
    row.update(image_id=np.int32(record.image_id), valid=np.int32(1))
    return row

  def collate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = {k: np.stack([r[k] for r in rows]) for k in ("image", "image_id", "index", "valid")}
    batch[STATS] = {reason: sum(r["skip"] == reason for r in rows) for reason in
                    ("missing", "corrupt")}
    return batch

  ds = (grain.MapDataset.range(num_batches * batch_size).map(load)
        .batch(batch_size, batch_fn=collate))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=2 * num_threads))


def eval_texts(source: Sequence[PairedRecord], text: TextEncoder | Mapping[str, TextEncoder]
               ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Every non-empty caption of the source, image-major: (text_fields(...) [T, L] plus
  caption_to_index int32 [T] (the image's position in the source) and caption_index int32 [T],
  {"empty_caption": captions skipped}). The evaluator also drops captions whose image came back
  with valid 0 from eval_dataset."""
  encoders = _encoders(text, "text")
  captions, owner, slot, empty = [], [], [], 0
  # A Karpathy split lists its captions; other sources are read record by record.
  listed = getattr(source, "captions", None)
  for index in range(len(source)):
    for c, caption in enumerate(listed[index] if listed is not None else source[index].captions):
      if caption.strip():
        captions.append(caption)
        owner.append(index)
        slot.append(c)
      else:
        empty += 1
  fields = text_fields(encoders, captions)
  fields["caption_to_index"] = np.asarray(owner, np.int32)
  fields["caption_index"] = np.asarray(slot, np.int32)
  return fields, {"empty_caption": empty}


class ZipBatches(grain.IterDataset):
  """One batch from each of two training streams of the same batch size, merged: `images`
  gives image / image_id, `texts` text fields / caption_index; "stats" are summed. State:
  {"image": ..., "text": ...}, each stream's own."""

  def __init__(self, images: grain.IterDataset, texts: grain.IterDataset):
    super().__init__([images, texts])
    self.images, self.texts = images, texts

  def __iter__(self) -> "_ZipBatchesIterator":
    return _ZipBatchesIterator(iter(self.images), iter(self.texts))

  def __str__(self) -> str:
    return "ZipBatches(images, texts)"


class _ZipBatchesIterator(grain.DatasetIterator):

  def __init__(self, images: grain.DatasetIterator, texts: grain.DatasetIterator):
    super().__init__([images, texts])
    self._images, self._texts = images, texts

  def __next__(self) -> dict[str, Any]:
    image, text = next(self._images), next(self._texts)
    batch = {k: v for k, v in image.items() if k != STATS}
    batch.update({k: v for k, v in text.items() if k not in (STATS, "image_id")})
    batch[STATS] = {r: image[STATS].get(r, 0) + text[STATS].get(r, 0) for r in SKIP_REASONS}
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"image": self._images.get_state(), "text": self._texts.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._images.set_state(state["image"])
    self._texts.set_state(state["text"])
