"""Sharded webdataset tar files (the format img2dataset writes and open_clip / MobileCLIP read
CC3M / CC12M / LAION subsets from), read with Python's tarfile; no `webdataset` package.

A sample is the consecutive tar members sharing a key: the member path up to the first dot of its
base name ("shard/000123.jpg" -> key "shard/000123", extension "jpg"; webdataset's convention).
Image: the first of .jpg / .jpeg / .png / .webp. Captions: .txt (UTF-8), else .json (a string, a
list of strings, or an object with "caption" / "captions" holding either). Process p of n reads
shards p, p + n, ... of the sorted shard list (disjoint, together all of them); each epoch visits
its shards in an order shuffled by (seed, epoch) and each shard's samples in tar order."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from jaxdistill.data.real.records import DataError, PairedRecord, key_to_id

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
  """"a-{000..002}.tar" -> ["a-000.tar", "a-001.tar", "a-002.tar"] (zero padding kept: the width
  of the first bound) and "{a,b}" -> alternatives; several groups multiply out, left to right."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  numeric = _RANGE.match(body)
  if numeric:
    lo, hi = numeric.groups()
    if int(hi) < int(lo):
      raise DataError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
    options = [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]
  else:
    options = body.split(",")
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [head + option + rest for option in options for rest in expand_braces(tail)]


def list_shards(pattern: str | Sequence[str]) -> list[str]:
  """The sorted, de-duplicated shard paths of brace patterns / globs (or an explicit list).
  DataError when nothing matches or a named (non-glob) file is missing."""
  patterns = [pattern] if isinstance(pattern, str) else list(pattern)
  shards = set()
  for item in patterns:
    for path in expand_braces(item):
      if glob.has_magic(path):
        found = glob.glob(path)
        if not found:
          raise DataError(f"shard pattern {item!r}: no file matches {path!r}; check the path")
        shards.update(found)
      elif os.path.isfile(path):
        shards.add(path)
      else:
        raise DataError(f"shard {path} (from {item!r}) does not exist; fix the pattern or the "
                        "shard range")
  if not shards:
    raise DataError(f"shard pattern {pattern!r} names no files")
  return sorted(shards)


def shards_for_process(shards: Sequence[str], process_index: int,
                       process_count: int) -> list[tuple[int, str]]:
  """(global shard number, path) of the shards process `process_index` of `process_count` reads:
  numbers p, p + n, ...; disjoint across processes and together every shard once."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
  if len(shards) < process_count:
    raise DataError(f"{len(shards)} shards for {process_count} processes: every process reads "
                    "whole shards of its own, so write the data into at least "
                    f"{process_count} shards (more: a multiple of {process_count} keeps them "
                    "even) or run on fewer processes")
  return [(i, shards[i]) for i in range(process_index, len(shards), process_count)]


def _split_name(name: str) -> tuple[str, str] | None:
  directory, base = os.path.split(name)
  if "." not in base or base.startswith("."):
    return None
  stem, ext = base.split(".", 1)
  return (os.path.join(directory, stem) if directory else stem), ext.lower()


def iter_tar(path: str, skip: int = 0) -> Iterator[dict[str, Any]]:
  """The samples of one tar: {"__key__": key, ext: bytes, ...}, in tar order; the first `skip`
  samples are passed over without reading their data. A damaged tar ends with one
  {"__key__": ..., "__error__": "corrupt"} sample (the pipeline counts it) instead of raising."""
  count = 0
  current: str | None = None
  members: list[tuple[str, tarfile.TarInfo]] = []
  try:
    with tarfile.open(path, "r:*") as tar:
      def emit():
        sample = {"__key__": current}
        for ext, info in members:
          handle = tar.extractfile(info)
          sample[ext] = handle.read() if handle is not None else b""
        return sample

      for info in tar:
        if not info.isfile():
          continue
        parsed = _split_name(info.name)
        if parsed is None:
          continue
        key, ext = parsed
        if key != current:
          if current is not None:
            if count >= skip:
              yield emit()
            count += 1
          current, members = key, []
        members.append((ext, info))
      if current is not None and count >= skip:
        yield emit()
  except (tarfile.TarError, OSError, EOFError) as e:
    logging.warning("webdataset shard %s is damaged after %d samples (%s); going on with the "
                    "next shard", path, count, e)
    yield {"__key__": f"{path}#{count}", "__error__": "corrupt"}


def _text(value: bytes) -> str:
  return value.decode("utf-8", errors="replace").strip()


def sample_captions(sample: dict[str, Any]) -> tuple[str, ...]:
  """Captions of a sample: its .txt, else its .json (str, list of str, or {"caption(s)": ...})."""
  if "txt" in sample:
    return (_text(sample["txt"]),)
  if "json" in sample:
    try:
      value = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
      return ()
    if isinstance(value, dict):
      value = value.get("captions", value.get("caption"))
    if isinstance(value, str):
      return (value.strip(),)
    if isinstance(value, list):
      return tuple(v.strip() for v in value if isinstance(v, str))
  return ()


def sample_to_record(sample: dict[str, Any], split: str = "") -> PairedRecord:
  """PairedRecord of a tar sample: image bytes (None without an image member), captions, the key
  as image_id (`records.key_to_id`); error "corrupt" for a damaged shard's marker."""
  key = sample["__key__"]
  image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
  return PairedRecord(image_id=key_to_id(key), image=image, captions=sample_captions(sample),
                      split=split, key=key, error=sample.get("__error__"))


class ShardSample(NamedTuple):
  """A record and where it sits in the stream: epoch, global shard number, sample number within
  the shard (the pipeline seeds its per-sample randomness with them)."""
  record: PairedRecord
  epoch: int
  shard: int
  index: int


class ShardStream(grain.IterDataset):
  """This process's samples, shard after shard: ShardSample elements.

  shards: every shard of the dataset (`list_shards`); this process reads `shards_for_process`.
  seed: shuffles the shard order per epoch (None: list order, e.g. for evaluation).
  num_epochs: None repeats forever. Iterator state {"epoch", "position" (into the epoch's shard
  order), "sample" (samples of that shard already returned)}: set_state reopens the shard and
  passes over those samples without reading their data."""

  def __init__(self, shards: Sequence[str], *, seed: int | None, process_index: int = 0,
               process_count: int = 1, num_epochs: int | None = None, split: str = ""):
    super().__init__()
    self.assigned = shards_for_process(list(shards), process_index, process_count)
    self.seed, self.num_epochs, self.split = seed, num_epochs, split

  def order(self, epoch: int) -> list[tuple[int, str]]:
    if self.seed is None:
      return list(self.assigned)
    permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.assigned))
    return [self.assigned[i] for i in permutation]

  def __iter__(self) -> "_ShardStreamIterator":
    return _ShardStreamIterator(self)

  def __str__(self) -> str:
    return f"ShardStream({len(self.assigned)} shards, seed={self.seed})"


class _ShardStreamIterator(grain.DatasetIterator):

  def __init__(self, stream: ShardStream):
    super().__init__()
    self._stream = stream
    self._state = {"epoch": 0, "position": 0, "sample": 0}
    self._samples: Iterator[dict[str, Any]] | None = None
    self._empty_shards = 0    # consecutive shards that held no sample

  def __next__(self) -> ShardSample:
    while True:
      epoch, position = self._state["epoch"], self._state["position"]
      if self._stream.num_epochs is not None and epoch >= self._stream.num_epochs:
        raise StopIteration
      order = self._stream.order(epoch)
      if self._samples is None:
        self._samples = iter_tar(order[position][1], skip=self._state["sample"])
      sample = next(self._samples, None)
      if sample is None:
        self._samples = None
        if self._state["sample"] == 0:
          self._empty_shards += 1
          if self._empty_shards > len(order):
            raise DataError(f"none of the {len(order)} shards of this process holds a sample "
                            f"(e.g. {order[position][1]}); check that they are webdataset tars")
        position += 1
        self._state = {"epoch": epoch + position // len(order), "position": position % len(order),
                       "sample": 0}
        continue
      self._empty_shards = 0
      index = self._state["sample"]
      self._state = {**self._state, "sample": index + 1}
      return ShardSample(sample_to_record(sample, self._stream.split), epoch, order[position][0],
                         index)

  def get_state(self) -> dict[str, int]:
    return dict(self._state)

  def set_state(self, state: dict[str, int]) -> None:
    self._state = {k: int(state[k]) for k in ("epoch", "position", "sample")}
    self._samples = None


def count_samples(shards: Sequence[str]) -> int:
  """Samples in these shards (reads every tar header; a convenience for tests and small sets)."""
  return sum(1 for shard in shards for _ in iter_tar(shard))

