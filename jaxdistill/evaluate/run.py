"""Evaluates a network's towers (models/build.py `Towers`) on a dataset's split (data/eval_split.py
`EvalSplit`: the bundled benchmark's or a real one's): dual-encoder retrieval with the Karpathy
protocol (and COCO's 1K folds), cross-encoder re-ranking of the dual top-k (paper 003 Table 13),
and, on the bundled benchmark, the binding probe for both encoders.

The similarity matrix is never materialised: the metrics read `retrieval.EmbeddingScores` one
query block of at most `config.eval.block_elements` scores at a time."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdistill.atomic import write_json_atomic
from jaxdistill.data.eval_split import EvalSplit, image_failures
from jaxdistill.evaluate.binding import binding_accuracy
from jaxdistill.evaluate.report import clip_benchmark_result, format_table
from jaxdistill.evaluate.rerank import rerank_recall
from jaxdistill.evaluate.retrieval import (DEFAULT_BLOCK_ELEMENTS, EmbeddingScores,
                                           embed_in_batches, recall_at_k)
from jaxdistill.models.build import Towers
from jaxdistill.store.provenance import provenance


def evaluate_and_report(towers: Towers, params, split: EvalSplit, config: ml_collections.ConfigDict,
                        verbose: bool = True) -> dict:
  """Returns {"dual": metrics, "dual+rerank@k": metrics (with a cross encoder; "dual+rerank@k
  (cross+dual)" with config.eval.rerank_score=cross+dual, ALBEF's re-ranking score), "split",
  "dataset", "num_images", "num_captions", "skipped", "dual_<fold>" (the mean over a fold
  protocol's folds, e.g. COCO's five 1K test folds as "dual_1k"), and with config.eval.ann
  "dual (scann)" (the recalls from ScaNN top-K lists, for galleries too large for exact search)
  with "scann" (its gap to exact search, neighbour recall@10, ms per query)}; prints the table.

  Images that could not be read (data/eval_split.py image_failures) and their captions are left
  out of the protocol and counted under "skipped". dual "query_ms": embedding both sides and
  ranking every query, over N_img + N_txt queries."""
  ev = config.eval
  block_elements = ev.get("block_elements", DEFAULT_BLOCK_ELEMENTS)
  embed_image = jax.jit(lambda images: towers.embed_image(params, images))
  embed_text = jax.jit(lambda ids, mask: towers.embed_text(params, ids, mask))
  texts = lambda ids, mask: embed_in_batches(lambda a: embed_text(a["ids"], a["mask"]),
                                             {"ids": ids, "mask": mask}, ev.batch_size)

  t0 = time.time()
  img_emb, img_tok = embed_in_batches(lambda a: embed_image(a["image"]),
                                      {"image": split.images}, ev.batch_size)
  failed = image_failures(split.images)
  keep_images = np.setdiff1d(np.arange(split.num_images), list(failed))
  keep_texts = np.flatnonzero(np.isin(split.caption_to_image, keep_images))
  new_row = np.full(split.num_images, -1, np.int64)
  new_row[keep_images] = np.arange(len(keep_images))
  txt_emb, txt_tok = texts(split.text_ids[keep_texts], split.text_mask[keep_texts])
  img_emb, img_tok = img_emb[keep_images], img_tok[keep_images]
  c2i = new_row[split.caption_to_image[keep_texts]].astype(np.int32)
  sim = EmbeddingScores(img_emb, txt_emb)
  dual = recall_at_k(sim, c2i, block_elements=block_elements)
  dual_seconds = time.time() - t0
  dual["query_ms"] = 1000 * dual_seconds / (sim.shape[0] + sim.shape[1])
  skipped = {reason: n for reason, n in split.skipped.items() if n}
  for reason in failed.values():
    skipped[reason] = skipped.get(reason, 0) + 1
  results = {"split": split.name, "dataset": split.dataset, "num_images": int(sim.shape[0]),
             "num_captions": int(sim.shape[1]), "skipped": skipped, "dual": dual}
  if ev.get("ann", False):   # the same queries through ScaNN indexes (evaluate/ann.py)
    from jaxdistill.evaluate.ann import ann_recall   # imports ScaNN: only when asked
    ann = ann_recall(img_emb, txt_emb, c2i)
    results["dual (scann)"] = ann["ann"]
    results["scann"] = {k: ann[k] for k in ("gap", "neighbor_recall@10", "ms_per_query",
                                            "index_params")}
  for fold_name, folds in split.folds.items():
    per_fold = []
    for rows in folds:
      rows = new_row[rows][new_row[rows] >= 0]
      caps = np.flatnonzero(np.isin(c2i, rows))
      remap = np.full(len(img_emb), -1, np.int64)
      remap[rows] = np.arange(len(rows))
      per_fold.append(recall_at_k(EmbeddingScores(img_emb[rows], txt_emb[caps]),
                                  remap[c2i[caps]].astype(np.int32), block_elements=block_elements))
    results[f"dual_{fold_name}"] = {k: float(np.mean([m[k] for m in per_fold]))
                                    for k in per_fold[0]}

  if split.probe is not None:
    true_ids, true_mask, false_ids, false_mask = (a[keep_images] for a in split.probe)
    true_emb, true_tok = texts(true_ids, true_mask)
    false_emb, false_tok = texts(false_ids, false_mask)
    dual["binding"] = binding_accuracy(np.sum(img_emb * true_emb, -1),
                                       np.sum(img_emb * false_emb, -1))

  if towers.match_scores is not None:
    rerank_score = ev.get("rerank_score", "cross")   # configs saved before the key lack it
    img_tok_d, txt_tok_d = jnp.asarray(img_tok), jnp.asarray(txt_tok)
    txt_mask_d = jnp.asarray(split.text_mask[keep_texts])

    @jax.jit
    def score_indexed(img_idx, txt_idx):
      return towers.match_scores(params, img_tok_d[img_idx], txt_tok_d[txt_idx], txt_mask_d[txt_idx])

    reranked, timing = rerank_recall(
        sim, c2i, lambda i, t: np.asarray(score_indexed(jnp.asarray(i), jnp.asarray(t))),
        k=ev.rerank_k, pair_batch_size=ev.pair_batch_size, block_elements=block_elements,
        score=rerank_score)
    reranked["query_ms"] = dual["query_ms"] + timing["ms_per_query"]

    if split.probe is not None:
      match = jax.jit(lambda i, t, m: towers.match_scores(params, i, t, m))
      n = len(true_ids)
      probe = lambda tok, mask: np.concatenate([
          np.asarray(match(img_tok[s:s + ev.batch_size], tok[s:s + ev.batch_size],
                           mask[s:s + ev.batch_size])) for s in range(0, n, ev.batch_size)])
      true_cross, false_cross = probe(true_tok, true_mask), probe(false_tok, false_mask)
      reranked["binding"] = binding_accuracy(true_cross, false_cross)
      if rerank_score == "cross+dual":   # the re-ranker's own score on the probe pairs
        reranked["binding_cross+dual"] = binding_accuracy(
            true_cross + np.sum(img_emb * true_emb, -1), false_cross + np.sum(img_emb * false_emb, -1))
    suffix = "" if rerank_score == "cross" else f" ({rerank_score})"
    results[f"dual+rerank@{ev.rerank_k}{suffix}"] = reranked
    results["rerank_timing"] = timing
  if verbose:
    probe_note = (" (binding probe: true vs minimally edited caption, chance 50%; the rerank "
                  "row's binding column is the cross encoder's)" if split.probe is not None else "")
    skip_note = f"; skipped {skipped}" if skipped else ""
    print(f"\n{split.dataset}: {sim.shape[0]} images x {sim.shape[1]} captions{skip_note}"
          f"{probe_note}")
    print(format_table({k: v for k, v in results.items() if isinstance(v, dict) and "rsum" in v}),
          flush=True)
  return results


def write_eval_results(workdir: str, name: str, results: dict, config: ml_collections.ConfigDict,
                       step: int) -> None:
  """Writes `results` with their `provenance` to <workdir>/<name> (eval.json, eval_<split>.json)
  and its "dual" recalls in
  CLIP_benchmark's retrieval format to <workdir>/clip_benchmark<suffix>.json beside it (suffix:
  name's after "eval"), both atomically. CLIP_benchmark fields: dataset
  "jaxdistill/<dataset>_<split>" (compositional_test, coco_test, ...), model "<model.kind>:<image_tower>+<text_tower>",
  pretrained "<abs workdir>@step<step>". With several processes only process 0 writes."""
  if not (name.startswith("eval") and name.endswith(".json")):
    raise ValueError(f"evaluation results go to eval*.json, got {name!r}")
  if jax.process_index() != 0:
    return
  write_json_atomic(os.path.join(workdir, name),
                    {**results, "provenance": provenance(workdir, config, step)})
  m = config.model
  clip = clip_benchmark_result(
      results["dual"], dataset=f"jaxdistill/{results['dataset']}",
      model=f"{m.kind}:{m.get('image_tower', 'vit')}+{m.get('text_tower', 'transformer')}",
      pretrained=f"{os.path.abspath(workdir)}@step{step}")
  write_json_atomic(os.path.join(workdir, "clip_benchmark" + name[len("eval"):]), clip)
