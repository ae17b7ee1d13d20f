"""Offline teacher features (`--mode=cache_teacher`): run a frozen teacher over a split once and
store, keyed by example (image) id, memory-mapped:

  image_emb [N, E]           dual teacher image embeddings
  text_emb  [N, C, E]        dual teacher embeddings of the C captions of each image
  i2t_index [N, K], i2t_score [N, K]        (cross teacher only) per image: its top-K captions
      by dual-teacher similarity (caption row = C * image_row + caption) and the cross teacher's
      match probability P(match) = softmax(ITM logits)[match] on each pair — CPRD's offline
      similarity bank (paper 002 §3.2.2:
      "use the dual-encoder to ... obtain the top-N hard negative texts for each image, then
      compute similarity scores of these pairs with the cross-encoder and store them")
  t2i_index [N*C, K], t2i_score [N*C, K]    the same per caption, over images

Layout: `<cache_dir>/<split>/` holds the .npy arrays and meta.json. It is written in a hidden
`<cache_dir>/.<split>.partial/` in chunks of `batch_size` rows; progress.json (written atomically
after the chunk's arrays are flushed) records the rows done, so a killed run resumes at the next
chunk and recomputes at most one. When every phase is done the partial directory is renamed to
`<split>/` in one `os.replace`: a reader never sees a half-written cache.
Rows whose teacher output is not finite are zeroed, marked invalid (`valid` [N]) and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxdistill.atomic import write_json_atomic
from jaxdistill.config import sharding_rules
from jaxdistill.data.benchmark import Benchmark
from jaxdistill.data.datasets import prepare_data
from jaxdistill.data.eval_split import captions_matrix, image_failures
from jaxdistill.data.real.image_ops import PREPROCESSOR_FILE, ImageSpec
from jaxdistill.errors import JaxDistillError
from jaxdistill.parallel.mesh import batch_sharding, make_mesh
from jaxdistill.parallel.sharding import tree_shardings
from jaxdistill.progress import Progress
from jaxdistill.teachers import MultiTeacher, load_teacher
from jaxdistill.teachers.base import Teacher, pair_match_probability

FORMAT_VERSION = 2   # 2: bank scores are P(match) (1: the match-class logit alone)
PHASES = ("embed", "i2t", "t2i")


class CacheError(JaxDistillError, ValueError):
  """A teacher cache that is missing, of another format or split, or cannot be built."""


class FeatureCache:
  """Read side: `FeatureCache(directory)` (a finished `<cache_dir>/<split>`), arrays memory-mapped.

  `lookup(image_ids)` -> dict of the rows of those examples (numpy); `rows(image_ids)` -> row
  indices. Attributes: image_ids [N], image_emb, text_emb, valid, and (cross bank) i2t_index,
  i2t_score, t2i_index, t2i_score; meta (dict)."""

  def __init__(self, directory: str):
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
      partial = os.path.join(os.path.dirname(os.path.abspath(directory)),
                             f".{os.path.basename(os.path.normpath(directory))}.partial")
      hint = (" (an unfinished cache is in " + partial + ": rerun --mode=cache_teacher to finish it)"
              if os.path.isdir(partial) else "")
      raise CacheError(f"no finished teacher cache at {directory}{hint}: build it with "
                              "python -m jaxdistill.main --mode=cache_teacher")
    with open(meta_path) as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT_VERSION:
      raise CacheError(f"{directory} has cache format {self.meta.get('format')}, this code reads "
                       f"{FORMAT_VERSION}: delete it and rerun --mode=cache_teacher")
    self.directory = directory
    for name in self.meta["arrays"]:
      setattr(self, name, np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r"))
    self._row_of = {int(i): r for r, i in enumerate(self.image_ids)}

  @property
  def has_bank(self) -> bool:
    return "i2t_score" in self.meta["arrays"]

  def rows(self, image_ids) -> np.ndarray:
    try:
      return np.asarray([self._row_of[int(i)] for i in np.asarray(image_ids).reshape(-1)], np.int64)
    except KeyError as e:
      raise KeyError(f"image id {e.args[0]} is not in the teacher cache {self.directory} (split "
                     f"{self.meta['split']!r}): cache the split the recipe trains on "
                     "(--config.teacher_cache.splits)") from None

  def lookup(self, image_ids) -> dict[str, np.ndarray]:
    """{image_emb [B,E], text_emb [B,C,E], valid [B], and with a bank i2t_index/i2t_score [B,K]}."""
    rows = self.rows(image_ids)
    out = {"image_emb": self.image_emb[rows], "text_emb": self.text_emb[rows], "valid": self.valid[rows]}
    if self.has_bank:
      out.update(i2t_index=self.i2t_index[rows], i2t_score=self.i2t_score[rows])
    return out


def _roles(teacher: Teacher | MultiTeacher) -> tuple[Teacher, Teacher | None]:
  """(dual teacher, cross teacher or None) of a Teacher or MultiTeacher."""
  if isinstance(teacher, MultiTeacher):
    cross = next((t for t in teacher.teachers.values() if t.is_cross), None)
    return teacher.dual, cross
  if not teacher.is_dual:
    raise CacheError(f"teacher {teacher.name!r} has no dual towers: the cache needs embed_images "
                     "and embed_texts (also to pick each example's top-N for the cross bank); use "
                     "a MultiTeacher with a dual teacher")
  return teacher, teacher if teacher.is_cross else None


def _open_arrays(directory: str, specs: dict[str, tuple[tuple[int, ...], str]], create: bool):
  """name -> writable np.memmap of `<directory>/<name>.npy` (created when `create`)."""
  arrays = {}
  for name, (shape, dtype) in specs.items():
    path = os.path.join(directory, f"{name}.npy")
    if create:
      arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    else:
      arrays[name] = np.load(path, mmap_mode="r+")
      if arrays[name].shape != shape:
        raise CacheError(f"{path} has shape {arrays[name].shape}, expected {shape}: delete "
                         f"{directory} and rerun --mode=cache_teacher")
  return arrays


def _padded(x: np.ndarray, size: int) -> np.ndarray:
  """Rows of x padded to `size` by repeating the last row (one compiled shape per phase)."""
  pad = size - len(x)
  return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x


def _tokens(teacher: Teacher, captions: list[list[str]], student_tokens) -> tuple[np.ndarray, ...]:
  """Caption ids / mask [N*C, L] in the teacher's vocabulary (its own tokenizer if it has one)."""
  if teacher.tokenize is not None:
    return teacher.tokenize([t for caps in captions for t in caps])
  if student_tokens is None:
    raise CacheError(f"teacher {teacher.name!r} has no tokenizer: pass the student's token ids")
  ids, mask = student_tokens
  return ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])


def cache_split(dual: Teacher, cross: Teacher | None, *, images: np.ndarray,
                captions: list[list[str]], image_ids: np.ndarray, out_dir: str, batch_size: int,
                top_n: int, student_tokens: tuple[np.ndarray, np.ndarray] | None = None,
                bank: tuple[str, ...] = ("i2t", "t2i"), mesh: Mesh | None = None,
                log: Callable[[str], None] = print) -> str:
  """Writes (or resumes, or keeps, if finished) the cache of one split at `out_dir`.

  images float32 [N,H,W,C] (normalised as the teacher reads them): an array or an array-like
  decoding the rows it is sliced for (data/real/dataset.py LazyImages; rows whose image cannot
  be read are marked invalid, data/eval_split.py image_failures); captions: N lists of C
  strings; image_ids int [N] unique; student_tokens (ids, mask) int32 [N,C,L], used for a
  teacher without its own tokenizer. bank: the cross-bank directions to build (with a cross
  teacher). `mesh`: inputs are batch-sharded on it when batch_size divides by its size.
  Returns out_dir."""
  partial = os.path.join(os.path.dirname(os.path.abspath(out_dir)),
                         f".{os.path.basename(os.path.normpath(out_dir))}.partial")
  if os.path.exists(os.path.join(partial, "meta.json")):   # killed between meta.json and rename
    os.replace(partial, out_dir)
  if os.path.exists(os.path.join(out_dir, "meta.json")):
    log(f"teacher cache {out_dir} is complete; nothing to do")
    return out_dir
  n, c = len(captions), len(captions[0])
  if len(np.unique(image_ids)) != n or len(images) != n:
    raise CacheError(f"cache_split needs {n} images with unique ids; got {len(images)} images and "
                     f"{len(np.unique(image_ids))} unique ids")
  top_n = min(top_n, n)
  flat_ids, flat_mask = _tokens(dual, captions, student_tokens)
  cross_ids, cross_mask = (_tokens(cross, captions, student_tokens) if cross not in (None, dual)
                           else (flat_ids, flat_mask))
  shard = (lambda x: jax.device_put(x, batch_sharding(mesh))) if (
      mesh is not None and batch_size % mesh.size == 0) else jnp.asarray
  embed_i = lambda x: dual.embed_images(dual.params, shard(x))
  embed_t = lambda i, m: dual.embed_texts(dual.params, shard(i), shard(m))
  e = int(jax.eval_shape(embed_i, jax.ShapeDtypeStruct((batch_size, *images.shape[1:]),
                                                       jnp.float32)).shape[-1])
  text_shape = jax.ShapeDtypeStruct((batch_size, flat_ids.shape[-1]), jnp.int32)
  e_text = int(jax.eval_shape(embed_t, text_shape, text_shape).shape[-1])
  specs = {"image_ids": ((n,), "int64"), "image_emb": ((n, e), "float32"),
           "text_emb": ((n, c, e_text), "float32"), "valid": ((n,), "bool")}
  if not set(bank) <= {"i2t", "t2i"}:
    raise CacheError(f"bank={bank!r}: use directions from ('i2t', 't2i')")
  bank = tuple(bank) if cross is not None else ()
  if bank:
    if e != e_text:
      raise CacheError(f"teacher {dual.name!r} embeds images to {e} and texts to {e_text} dims: the "
                       "cross bank's top-N needs one joint space (a dual teacher with heads)")
    rows = {"i2t": n, "t2i": n * c}
    for d in bank:
      specs.update({f"{d}_index": ((rows[d], top_n), "int32"), f"{d}_score": ((rows[d], top_n), "float32")})
  fingerprint = {"format": FORMAT_VERSION, "dual": dual.name, "cross": cross and cross.name,
                 "num_images": n, "captions_per_image": c, "text_len": int(flat_ids.shape[-1]),
                 "embed_dim": e, "text_dim": e_text,
                 "top_n": top_n, "bank": list(bank),
                 "batch_size": batch_size, "first_ids": [int(i) for i in image_ids[:4]]}

  progress_path = os.path.join(partial, "progress.json")
  resume = os.path.exists(progress_path)
  if resume:
    with open(progress_path) as f:
      state = json.load(f)
    if state["fingerprint"] != fingerprint:
      raise CacheError(f"the unfinished cache {partial} was started with {state['fingerprint']}, "
                       f"not {fingerprint}: delete {partial} to start over")
  else:
    shutil.rmtree(partial, ignore_errors=True)   # arrays without progress.json: nothing usable
    os.makedirs(partial)
    state = {"fingerprint": fingerprint, "done": {p: 0 for p in PHASES}, "invalid": 0}
  arrays = _open_arrays(partial, specs, create=not resume)
  if not resume:
    arrays["image_ids"][:] = image_ids
    arrays["image_ids"].flush()
    write_json_atomic(progress_path, state)

  def commit(phase: str, done: int) -> None:
    for a in arrays.values():
      a.flush()
    state["done"][phase] = done
    write_json_atomic(progress_path, state)

  def cross_scores(query_rows, cand, i2t):
    """P(match) [R, K] of the pairs (query row r, candidate cand[r, k]); i2t: images query.
    Each query and candidate is embedded once (pair p = query p // K, candidate p)."""
    r, k = cand.shape
    queries, cands = _padded(query_rows, batch_size), _padded(cand, batch_size).reshape(-1)
    img_rows, txt_rows = (queries, cands) if i2t else (cands, queries)
    pairs = np.arange(batch_size * k, dtype=np.int32)
    by_query, by_pair = pairs // k, pairs
    p = pair_match_probability(cross, cross.params, shard(images[img_rows]),
                               shard(cross_ids[txt_rows]), shard(cross_mask[txt_rows]),
                               *((by_query, by_pair) if i2t else (by_pair, by_query)))
    return np.asarray(p)[:r * k].reshape(r, k)

  def top(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    sim = np.asarray(jnp.matmul(jnp.asarray(query), jnp.asarray(keys).T,
                                precision=jax.lax.Precision.HIGHEST))
    return np.asarray(jax.lax.top_k(jnp.asarray(sim), top_n)[1], np.int32)

  def embed_chunk(s, t):
    img = np.asarray(embed_i(_padded(images[s:t], batch_size)))[:t - s]
    txt = np.concatenate([np.asarray(embed_t(_padded(flat_ids[r:r + batch_size], batch_size),
                                             _padded(flat_mask[r:r + batch_size], batch_size)))
                          for r in range(s * c, t * c, batch_size)])[:(t - s) * c].reshape(t - s, c, -1)
    failed = image_failures(images)
    ok = (np.isfinite(img).all(-1) & np.isfinite(txt).all((-2, -1))
          & ~np.isin(np.arange(s, t), list(failed)))
    state["invalid"] += int((~ok).sum())
    arrays["image_emb"][s:t] = np.where(ok[:, None], img, 0.0)
    arrays["text_emb"][s:t] = np.where(ok[:, None, None], txt, 0.0)
    arrays["valid"][s:t] = ok

  def i2t_chunk(s, t):
    cand = top(arrays["image_emb"][s:t], arrays["text_emb"].reshape(n * c, e))
    arrays["i2t_index"][s:t] = cand
    arrays["i2t_score"][s:t] = cross_scores(np.arange(s, t), cand, i2t=True)

  def t2i_chunk(s, t):
    cand = top(arrays["text_emb"].reshape(n * c, e)[s:t], arrays["image_emb"])
    arrays["t2i_index"][s:t] = cand
    arrays["t2i_score"][s:t] = cross_scores(np.arange(s, t), cand, i2t=False)

  phases = [("embed", n, embed_chunk)]
  phases += [p for p in (("i2t", n, i2t_chunk), ("t2i", n * c, t2i_chunk)) if p[0] in bank]
  total = sum(-(-rows // batch_size) for _, rows, _ in phases)
  offset = 0
  for name, rows, chunk in phases:
    start = state["done"][name]
    progress = Progress(total, batch_size, offset + start // batch_size)
    if start:
      log(f"resuming {name} of {out_dir} at row {start}/{rows}")
    for s in range(start, rows, batch_size):
      t = min(s + batch_size, rows)
      chunk(s, t)
      commit(name, t)
      k = offset + -(-t // batch_size)
      if k % 10 == 0 or t == rows:
        log(f"cache {os.path.basename(out_dir)} {name} {t}/{rows} rows | " + progress.line(k, {}))
    offset += -(-rows // batch_size)

  meta = dict(fingerprint, split=os.path.basename(os.path.normpath(out_dir)), arrays=sorted(specs),
              invalid_rows=state["invalid"], temperature=dual.temperature)
  write_json_atomic(os.path.join(partial, "meta.json"), meta)
  os.remove(progress_path)
  os.replace(partial, out_dir)
  log(f"wrote teacher cache {out_dir} ({n} images, {state['invalid']} invalid rows skipped)")
  return out_dir


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """--mode=cache_teacher: caches config.teachers[config.teacher_cache.teacher]'s features for
  config.teacher_cache.splits. Output: config.teacher_cache.dir, default
  `<workdir>/teacher_cache/<split>`. Its params are placed by config.sharding (parallel/sharding.py)."""
  tc = config.teacher_cache
  if not tc.teacher or tc.teacher not in config.teachers:
    raise CacheError(f"--mode=cache_teacher needs --config.teacher_cache.teacher naming one of "
                     f"the config's teachers {list(config.teachers)}")
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  teacher = load_teacher(config.teachers[tc.teacher])
  rules, min_size = sharding_rules(config), config.sharding.min_fsdp_size
  place = lambda t, name: dataclasses.replace(t, params=jax.device_put(t.params, tree_shardings(
      t.params, mesh, rules, min_size, prefix=f"frozen/{name}")))
  if isinstance(teacher, MultiTeacher):
    teacher = MultiTeacher({k: place(t, tc.teacher) for k, t in teacher.teachers.items()})
  else:
    teacher = place(teacher, tc.teacher)
  dual, cross = _roles(teacher)
  data = prepare_data(config, workdir)
  spec = config.teachers[tc.teacher]
  cache_dir = tc.dir or os.path.join(workdir, "teacher_cache")
  os.makedirs(cache_dir, exist_ok=True)
  written = {}
  for split in [s.strip() for s in tc.splits.split(",") if s.strip()]:
    if isinstance(data, Benchmark):
      if split not in data.splits:
        raise CacheError(f"--config.teacher_cache.splits names {split!r}: use "
                         f"{', '.join(data.splits)}")
      ev = data.eval_split(split)
    else:   # real images at the teacher's own resolution and normalisation when it says them
      ev = data.eval_split(split, image=_teacher_image_spec(spec, data.image))
    per_image = max(len(c) for c in ev.captions)
    captions = [tuple(c) + ("",) * (per_image - len(c)) for c in ev.captions]
    written[split] = cache_split(
        dual, cross, images=ev.images, captions=captions, image_ids=ev.image_ids,
        out_dir=os.path.join(cache_dir, split), batch_size=tc.batch_size, top_n=tc.top_n,
        student_tokens=captions_matrix(ev, per_image), mesh=mesh)
  return written


def _teacher_image_spec(spec, default: ImageSpec) -> ImageSpec:
  """A pretrained teacher's preprocessor_config.json ImageSpec, else `default` (the data's)."""
  path = spec.path if os.path.isdir(spec.path) else os.path.dirname(spec.path)
  if spec.kind == "pretrained" and os.path.isfile(os.path.join(path, PREPROCESSOR_FILE)):
    return ImageSpec.from_preprocessor_config(path)
  return default


def add_cached_features(batch: dict, caches: dict[str, "FeatureCache"]) -> dict:
  """The batch with, for each {name: cache}, the cached teacher features of its examples:
  <name>_image_emb float32 [b, E], <name>_text_emb float32 [b, E] (the caption the batch holds,
  by caption_index), <name>_valid int32 [b] (0: the teacher's output was not finite or its image
  unreadable). Looked up on the host by image_id, so a resumed run gets the same features."""
  if not caches:
    return batch
  batch = dict(batch)
  for name, cache in caches.items():
    rows = cache.rows(batch["image_id"])
    slot = np.asarray(batch["caption_index"], np.int64)
    batch[f"{name}_image_emb"] = np.asarray(cache.image_emb[rows], np.float32)
    batch[f"{name}_text_emb"] = np.asarray(cache.text_emb[rows, slot], np.float32)
    batch[f"{name}_valid"] = np.asarray(cache.valid[rows], np.int32)
  return batch


def from_cache(path: str, dtype: str = "float32") -> Teacher:
  """A dual teacher whose embeddings were cached by --mode=cache_teacher (`path`: a finished
  `<cache_dir>/<split>`, the split the run trains on): no params and no apply functions; the
  trainer adds its features to every batch (add_cached_features, Teacher.features) and the
  recipe reads them there. temperature: the cached teacher's, when it said one."""
  del dtype   # the features are stored in float32
  try:
    cache = FeatureCache(path)
  except CacheError as e:
    raise CacheError(f"teacher kind cache: {e}") from None
  return Teacher(name=f"cache:{cache.meta.get('dual')}", params={}, embed_images=None,
                 embed_texts=None, match_scores=None, temperature=cache.meta.get("temperature"),
                 features=path)
