"""--mode=mine: embed a split with a trained run's towers, index it with ScaNN (or search it
exactly), and write the hard-negative banks (paper 000 §3.2.2 HN; the order of its stage 2:
train, then mine with the trained towers, then train with the mined negatives).

Outputs under <workdir>/mining/: images.npy, captions.npy (embeddings, resumable),
index_captions/, index_images/ (ScaNN, reused when built from the same embeddings), and
mine.json (sizes, index parameters, timings, recall of the search against exact top-K on
`recall_queries` queries); the banks go to config.mining.bank_dir ("" = <workdir>/bank).
Every file is written atomically, so a killed run is resumed by running the command again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np

from jaxdistill.atomic import write_json_atomic
from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.data.compositional import normalize_images
from jaxdistill.data.negatives import I2T_FILE, T2I_FILE, caption_ids, write_bank
from jaxdistill.errors import JaxDistillError
from jaxdistill.mining.embed import embed_corpus
from jaxdistill.mining.exact import exact_top_k, neighbor_recall
from jaxdistill.mining.scann_index import (META_FILE, Index, build_index, derive_params,
                                           load_index, save_index)
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.store.provenance import provenance
from jaxdistill.store.run import load_run


class MiningError(JaxDistillError, ValueError):
  """A --mode=mine setting that cannot work; the message names it and the fix."""


def _index(corpus: np.ndarray, directory: str, fingerprint: str, k: int, mi) -> tuple[Index, float]:
  """The saved index when it was built from the same embeddings, else a new one (saved)."""
  meta_path = os.path.join(directory, META_FILE)
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      if json.load(f).get("fingerprint") == fingerprint:
        return load_index(directory)[0], 0.0
  overrides = {name: mi[name] for name in ("num_leaves", "num_leaves_to_search",
                                           "training_sample_size", "reorder")}
  params = derive_params(len(corpus), k, leaves_to_search_fraction=mi.leaves_to_search_fraction,
                         overrides=overrides)
  t0 = time.time()
  index = build_index(corpus, params, k)
  seconds = time.time() - t0
  save_index(index, directory, {"fingerprint": fingerprint})
  return index, seconds


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mi = config.mining
  if not mi.tower_workdir:
    raise MiningError("--mode=mine needs --config.mining.tower_workdir: the --workdir of the "
                     "trained run whose towers embed the corpus")
  tower = load_run(mi.tower_workdir, what="--config.mining.tower_workdir")
  out = os.path.join(workdir, "mining")
  bank_dir = mi.bank_dir or os.path.join(workdir, "bank")
  os.makedirs(out, exist_ok=True)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  tower_config, params, step = tower.config, tower.params, tower.step
  if tower_config.data.get("name", "fashion_grid") != "fashion_grid":
    raise MiningError(f"--config.mining.tower_workdir={mi.tower_workdir!r} was trained on "
                      f"{tower_config.data.name}: --mode=mine builds hard-negative banks for the "
                      "bundled benchmark only (its pipeline joins banked images from memory); "
                      "train real-data runs without mined negatives")
  bench = prepare_benchmark(tower_config, mi.tower_workdir)   # the tower's own tokenizer
  split = bench.splits[mi.split]
  ids, mask = bench.tokens[mi.split]
  n, per_image, length = ids.shape
  dim = tower_config.model.embed_dim
  fingerprint = f"{os.path.abspath(mi.tower_workdir)}@{step}:{mi.split}:{n}x{per_image}"

  # --- embed (resumable) ---
  embed_image = jax.jit(lambda b: tower.towers.embed_image(params, b["image"])[0])
  embed_text = jax.jit(lambda b: tower.towers.embed_text(params, b["ids"], b["mask"])[0])
  common = dict(dim=dim, batch_size=mi.embed_batch_size, mesh=mesh, fingerprint=fingerprint)
  t0 = time.time()
  img = embed_corpus(embed_image, {"image": normalize_images(split.images)},
                     os.path.join(out, "images.npy"), name="images", **common)
  txt = embed_corpus(embed_text, {"ids": ids.reshape(-1, length), "mask": mask.reshape(-1, length)},
                     os.path.join(out, "captions.npy"), name="captions", **common)
  embed_seconds = time.time() - t0
  img, txt = np.asarray(img), np.asarray(txt)

  # --- search: i2t (images -> captions of other images), t2i (captions -> other images) ---
  image_owner = split.image_ids.astype(np.int64)
  caption_owner = np.repeat(image_owner, per_image)
  caption_key = caption_ids(caption_owner, np.tile(np.arange(per_image), n), per_image)
  k = mi.num_neighbors
  directions = {"i2t": (img, image_owner, txt, caption_owner, per_image, "captions"),
                "t2i": (txt, caption_owner, img, image_owner, 1, "images")}
  report = {"tower_workdir": mi.tower_workdir, "tower_step": step, "split": mi.split,
            "num_images": n, "num_captions": n * per_image, "dim": dim, "k": k,
            "search": mi.search, "embed_seconds": embed_seconds}
  results = {}
  rng = np.random.default_rng(0)
  for name, (queries, q_owner, corpus, c_owner, max_pos, corpus_name) in directions.items():
    t0 = time.time()
    if mi.search == "scann":
      index, build_seconds = _index(corpus, os.path.join(out, f"index_{corpus_name}"), fingerprint,
                                    k + max_pos, mi)
      t0 = time.time()
      scores, found = index.search_excluding(queries, k, q_owner, c_owner, max_pos)
      entry = {"index_params": dataclasses.asdict(index.params),
               "build_seconds": build_seconds}
    else:
      scores, found = exact_top_k(queries, corpus, k, query_owner=q_owner, corpus_owner=c_owner,
                                  mesh=mesh)
      entry = {}
    entry["search_seconds"] = time.time() - t0
    if mi.search == "scann" and mi.recall_queries:
      sample = rng.choice(len(queries), min(mi.recall_queries, len(queries)), replace=False)
      _, exact = exact_top_k(queries[sample], corpus, k, query_owner=q_owner[sample],
                             corpus_owner=c_owner, mesh=mesh)
      entry[f"recall@{min(10, k)}_vs_exact"] = neighbor_recall(found[sample, :10], exact[:, :10])
      entry[f"recall@{k}_vs_exact"] = neighbor_recall(found[sample], exact)
    results[name] = (scores, found)
    report[name] = entry
    print(f"mine {name}: {len(queries)} queries x {len(corpus)} {corpus_name}: "
          f"{json.dumps(entry)}", flush=True)

  # --- banks (atomic): corpus rows -> example ids ---
  scores, found = results["i2t"]
  write_bank(os.path.join(bank_dir, I2T_FILE), image_owner,
             np.where(found >= 0, caption_key[np.maximum(found, 0)], -1), scores)
  scores, found = results["t2i"]
  write_bank(os.path.join(bank_dir, T2I_FILE), caption_key,
             np.where(found >= 0, image_owner[np.maximum(found, 0)], -1), scores)
  report["bank_dir"] = bank_dir
  report["provenance"] = provenance(mi.tower_workdir, config, step)
  write_json_atomic(os.path.join(out, "mine.json"), report)
  print(f"banks written to {bank_dir} ({I2T_FILE}: {n} images, {T2I_FILE}: {n * per_image} "
        f"captions, {k} negatives each)", flush=True)
  return report
