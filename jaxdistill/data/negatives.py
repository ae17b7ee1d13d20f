"""The hard-negative bank: for each example id, the ids and scores of its top-K mined negatives.

One bank is one .npy file of records (key int64, ids int64 [K], scores float32 [K]), sorted by
key, opened memory-mapped (so a bank for millions of examples costs no RAM until read) and
written atomically (temporary name, fsync, os.replace). Entries that were not found (a corpus
smaller than K) hold id -1.

A mined benchmark has two banks in one directory (paper 000 §3.2.2 HN, both directions):
  i2t.npy: image id -> caption ids of other images (negative texts for the image);
  t2i.npy: caption id -> image ids other than its own (negative images for the caption);
with caption id = image_id * captions_per_image + caption slot (`caption_ids`).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
from jaxdistill.atomic import atomic_open
from jaxdistill.errors import JaxDistillError


def is_negative(owner, query_owner):
  """Whether a mined candidate may serve as a negative of a query: it is in the bank (not
  MISSING) and belongs to another image. owner, query_owner: broadcastable int arrays (numpy or
  jax; e.g. [B, k] against [B, 1], or [1, M] against [B, 1]) -> bool of the broadcast shape."""
  return (owner != MISSING) & (owner != query_owner)


class BankError(JaxDistillError, ValueError):
  """A hard-negative bank that is missing, malformed or mined on other data."""


I2T_FILE, T2I_FILE = "i2t.npy", "t2i.npy"
MISSING = -1


def caption_ids(image_ids: np.ndarray, slots: np.ndarray, captions_per_image: int) -> np.ndarray:
  """int64 caption id of (image id, slot) pairs, same shape."""
  return np.asarray(image_ids, np.int64) * captions_per_image + np.asarray(slots, np.int64)


def write_bank(path: str, keys: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
  """keys int [N] (unique), ids int [N, K] (-1 = none), scores float [N, K] -> `path` (atomic)."""
  keys = np.asarray(keys, np.int64)
  ids, scores = np.asarray(ids), np.asarray(scores)
  n = len(keys)
  if ids.ndim != 2 or ids.shape[0] != n or scores.shape != ids.shape:
    raise BankError(f"write_bank needs keys [N], ids [N, K] and scores [N, K]; got {keys.shape}, "
                     f"{ids.shape}, {scores.shape}")
  if len(np.unique(keys)) != n:
    raise BankError(f"write_bank: keys for {path} are not unique")
  k = ids.shape[1]
  records = np.empty(n, dtype=[("key", np.int64), ("ids", np.int64, (k,)),
                               ("scores", np.float32, (k,))])
  order = np.argsort(keys, kind="stable")
  records["key"], records["ids"], records["scores"] = keys[order], ids[order], scores[order]
  with atomic_open(path, "wb") as f:
    np.save(f, records)


class Bank:
  """A bank opened memory-mapped. keys int64 [N] (sorted), ids int64 [N, K], scores [N, K]."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no hard-negative bank at {path}: mine one first with "
                              "--mode=mine (see docs/mining.md)")
    try:
      records = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
      raise BankError(f"{path} is not a hard-negative bank ({e}): re-mine it with --mode=mine")
    if records.ndim != 1 or set(records.dtype.names or ()) != {"key", "ids", "scores"}:
      raise BankError(f"{path} is not a hard-negative bank (dtype {records.dtype}): re-mine it "
                       "with --mode=mine")
    self.keys, self.ids, self.scores = records["key"], records["ids"], records["scores"]
    self.path = path

  @property
  def k(self) -> int:
    return self.ids.shape[1]

  def __len__(self) -> int:
    return len(self.keys)

  def lookup(self, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First k negatives of each key: keys int [...] -> (ids int64 [..., k], scores [..., k]);
    keys absent from the bank get ids -1 (MISSING) and scores -inf."""
    if not 1 <= k <= self.k:
      raise BankError(f"asked for {k} hard negatives but the bank {self.path} holds {self.k} "
                       f"per example: use --config.<method>.hard_negatives <= {self.k} or re-mine "
                       "with a larger --config.mining.num_neighbors")
    keys = np.asarray(keys, np.int64)
    pos = np.clip(np.searchsorted(self.keys, keys.reshape(-1)), 0, max(len(self.keys) - 1, 0))
    found = (self.keys[pos] == keys.reshape(-1)) if len(self.keys) else np.zeros(keys.size, bool)
    ids = np.where(found[:, None], self.ids[pos, :k], MISSING)
    scores = np.where(found[:, None], self.scores[pos, :k], -np.inf)
    return ids.reshape(*keys.shape, k), scores.reshape(*keys.shape, k).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TrainingNegatives:
  """What the training pipeline attaches: k negatives per example from both banks."""
  i2t: Bank
  t2i: Bank
  k: int
  captions_per_image: int


def training_negatives(config: ml_collections.ConfigDict, image_ids: np.ndarray,
                       captions_per_image: int) -> TrainingNegatives | None:
  """The banks named by config.mining.bank_dir when the recipe's section asks for
  `hard_negatives` > 0 (else None); checks that they cover the training examples and reports how
  many examples lack some negative (those entries are masked out of the loss)."""
  section = config.get(config.get("method", ""), None)
  k = int(section.get("hard_negatives", 0)) if section is not None else 0
  if k <= 0:
    return None
  bank_dir = config.mining.bank_dir
  negatives = TrainingNegatives(Bank(os.path.join(bank_dir, I2T_FILE)),
                                Bank(os.path.join(bank_dir, T2I_FILE)), k, captions_per_image)
  text_ids, _ = negatives.i2t.lookup(image_ids, k)
  slots = np.arange(captions_per_image)
  image_neg, _ = negatives.t2i.lookup(caption_ids(image_ids[:, None], slots, captions_per_image), k)
  lacking_i2t = int(np.any(text_ids == MISSING, axis=-1).sum())
  lacking_t2i = int(np.any(image_neg == MISSING, axis=-1).sum())
  if lacking_i2t == len(image_ids):
    raise BankError(f"the bank in --config.mining.bank_dir={bank_dir} covers none of the "
                     f"{len(image_ids)} training images: it was mined on other data; re-mine with "
                     "this run's data config (--mode=mine)")
  print(f"hard negatives: k={k} from {bank_dir}; {lacking_i2t}/{len(image_ids)} images and "
        f"{lacking_t2i}/{image_neg.shape[0] * captions_per_image} captions lack some negative "
        "(masked)", flush=True)
  return negatives
