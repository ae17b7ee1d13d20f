"""Embedding a whole corpus with a tower: batched, sharded over the mesh, with progress and ETA,
resumable, and written atomically.

Rows go into `<path>.partial` (a memory-mapped .npy of the final shape); after each chunk of
rows is flushed, `<path>.progress.json` records how many rows are done (replaced atomically).
A killed run resumes from the last recorded row; when all rows are done the partial file is
renamed to `path`, so `path` only ever holds a complete corpus. The progress file carries a
fingerprint (which tower, which data): a partial written by another tower is started over.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdistill.atomic import write_json_atomic
from jaxdistill.parallel.mesh import batch_sharding


def embed_corpus(embed_fn: Callable[[dict], jax.Array], arrays: dict[str, np.ndarray],
                 path: str, *, dim: int, batch_size: int, mesh: Mesh | None = None,
                 fingerprint: str = "", chunk_batches: int = 8, name: str = "corpus",
                 log_every_s: float = 10.0) -> np.ndarray:
  """Embeds every row of `arrays` ({name: [N, ...]}, one shared N) into float32 [N, dim] at `path`.

  embed_fn: a jitted fn {name: [batch_size, ...]} -> [batch_size, dim]; batches are placed
  sharded over the mesh's batch axes (batch_size is rounded up to a multiple of the device
  count; the last batch is padded by repeating its last row, padding dropped). Returns the
  finished array, memory-mapped read-only. An existing complete `path` is returned as is.
  """
  if os.path.exists(path):
    done = np.load(path, mmap_mode="r")
    if done.shape[1:] != (dim,):
      raise ValueError(f"{path} holds embeddings of shape {done.shape}, expected [N, {dim}]: "
                       "delete it (or use a fresh --workdir) to re-embed")
    return done
  sizes = {k: len(v) for k, v in arrays.items()}
  if not sizes or len(set(sizes.values())) != 1:
    raise ValueError(f"embed_corpus needs arrays with one shared leading size; got {sizes}")
  n = next(iter(sizes.values()))
  devices = mesh.size if mesh is not None else 1
  batch_size = -(-batch_size // devices) * devices
  partial, progress_path = path + ".partial", path + ".progress.json"
  start = 0
  if os.path.exists(partial) and os.path.exists(progress_path):
    with open(progress_path) as f:
      progress = json.load(f)
    if progress.get("fingerprint") == fingerprint and progress.get("shape") == [n, dim]:
      start = int(progress["rows"])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if start == 0:
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, dim))
    write_json_atomic(progress_path, {"rows": 0, "shape": [n, dim], "fingerprint": fingerprint})
  else:
    out = np.load(partial, mmap_mode="r+")
    print(f"embed {name}: resuming at row {start}/{n}", flush=True)
  put = (lambda x: jax.device_put(x, batch_sharding(mesh))) if mesh is not None else None

  def batch_at(s: int) -> dict:
    rows = {k: np.asarray(v[s:s + batch_size]) for k, v in arrays.items()}
    pad = batch_size - len(next(iter(rows.values())))
    if pad:
      rows = {k: np.concatenate([r, np.repeat(r[-1:], pad, axis=0)]) for k, r in rows.items()}
    return jax.tree.map(put, rows) if put else rows

  t0, last_log, chunk_rows = time.time(), time.time(), batch_size * chunk_batches
  for s in range(start, n, batch_size):
    emb = np.asarray(embed_fn(batch_at(s)), np.float32)
    if emb.shape != (batch_size, dim):
      raise ValueError(f"embed_fn returned {emb.shape}, expected [{batch_size}, {dim}]")
    end = min(s + batch_size, n)
    out[s:end] = emb[:end - s]
    if (end - start) % chunk_rows == 0 or end == n:
      out.flush()
      write_json_atomic(progress_path, {"rows": end, "shape": [n, dim], "fingerprint": fingerprint})
    if time.time() - last_log >= log_every_s or end == n:
      rate = (end - start) / max(time.time() - t0, 1e-9)
      print(f"embed {name}: {end}/{n} rows ({100 * end / n:.0f}%), {rate:.0f} rows/s, "
            f"ETA {(n - end) / max(rate, 1e-9):.0f} s", flush=True)
      last_log = time.time()
  out.flush()
  del out
  os.replace(partial, path)
  os.remove(progress_path)
  return np.load(path, mmap_mode="r")
