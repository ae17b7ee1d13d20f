"""Evaluates a network's towers (models/build.py `Towers`) on a benchmark split: dual-encoder retrieval, cross-encoder
re-ranking of the dual top-k (paper 003 Table 13), and the binding probe for both encoders.

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
from jaxdistill.data.benchmark import Benchmark
from jaxdistill.data.pipeline import eval_arrays
from jaxdistill.evaluate.binding import binding_accuracy
from jaxdistill.evaluate.report import clip_benchmark_result, format_table
from jaxdistill.evaluate.rerank import rerank_recall
from jaxdistill.evaluate.retrieval import (DEFAULT_BLOCK_ELEMENTS, EmbeddingScores,
                                           embed_in_batches, recall_at_k)
from jaxdistill.models.build import Towers


def evaluate_and_report(towers: Towers, params, bench: Benchmark, config: ml_collections.ConfigDict,
                        split: str, verbose: bool = True) -> dict:
  """Returns {"dual": metrics, "dual+rerank@k": metrics, "split": split}; prints the table.

  dual "query_ms": embedding both sides and ranking every query, over N_img + N_txt queries.
  """
  ev = config.eval
  block_elements = ev.get("block_elements", DEFAULT_BLOCK_ELEMENTS)
  arrays = eval_arrays(bench.splits[split], *bench.tokens[split])
  embed_image = jax.jit(lambda images: towers.embed_image(params, images))
  embed_text = jax.jit(lambda ids, mask: towers.embed_text(params, ids, mask))

  t0 = time.time()
  img_emb, img_tok = embed_in_batches(lambda a: embed_image(a["image"]),
                                      {"image": arrays["image"]}, ev.batch_size)
  txt_emb, txt_tok = embed_in_batches(lambda a: embed_text(a["ids"], a["mask"]),
                                      {"ids": arrays["text_ids"], "mask": arrays["text_mask"]},
                                      ev.batch_size)
  sim = EmbeddingScores(img_emb, txt_emb)
  c2i = arrays["caption_to_image"]
  dual = recall_at_k(sim, c2i, block_elements=block_elements)
  dual_seconds = time.time() - t0
  dual["query_ms"] = 1000 * dual_seconds / (sim.shape[0] + sim.shape[1])

  true_ids, true_mask, false_ids, false_mask = bench.probe_tokens[split]
  true_emb, true_tok = embed_in_batches(lambda a: embed_text(a["ids"], a["mask"]),
                                        {"ids": true_ids, "mask": true_mask}, ev.batch_size)
  false_emb, false_tok = embed_in_batches(lambda a: embed_text(a["ids"], a["mask"]),
                                          {"ids": false_ids, "mask": false_mask}, ev.batch_size)
  dual["binding"] = binding_accuracy(np.sum(img_emb * true_emb, -1), np.sum(img_emb * false_emb, -1))
  results = {"split": split, "dual": dual}

  if towers.match_scores is not None:
    img_tok_d, txt_tok_d = jnp.asarray(img_tok), jnp.asarray(txt_tok)
    txt_mask_d = jnp.asarray(arrays["text_mask"])

    @jax.jit
    def score_indexed(img_idx, txt_idx):
      return towers.match_scores(params, img_tok_d[img_idx], txt_tok_d[txt_idx], txt_mask_d[txt_idx])

    reranked, timing = rerank_recall(
        sim, c2i, lambda i, t: np.asarray(score_indexed(jnp.asarray(i), jnp.asarray(t))),
        k=ev.rerank_k, pair_batch_size=ev.pair_batch_size, block_elements=block_elements)
    reranked["query_ms"] = dual["query_ms"] + timing["ms_per_query"]

    match = jax.jit(lambda i, t, m: towers.match_scores(params, i, t, m))
    n = len(true_ids)
    probe = lambda tok, mask: np.concatenate([
        np.asarray(match(img_tok[s:s + ev.batch_size], tok[s:s + ev.batch_size],
                         mask[s:s + ev.batch_size])) for s in range(0, n, ev.batch_size)])
    reranked["binding"] = binding_accuracy(probe(true_tok, true_mask), probe(false_tok, false_mask))
    results[f"dual+rerank@{ev.rerank_k}"] = reranked
    results["rerank_timing"] = timing
  if verbose:
    print(f"\n{split} split: {sim.shape[0]} images x {sim.shape[1]} captions "
          f"(binding probe: true vs minimally edited caption, chance 50%; the rerank row's "
          f"binding column is the cross encoder's)")
    print(format_table({k: v for k, v in results.items() if isinstance(v, dict) and "rsum" in v}),
          flush=True)
  return results


def write_eval_results(workdir: str, name: str, results: dict, config: ml_collections.ConfigDict,
                       step: int) -> None:
  """Writes `results` to <workdir>/<name> (eval.json, eval_<split>.json) and its "dual" recalls in
  CLIP_benchmark's retrieval format to <workdir>/clip_benchmark<suffix>.json beside it (suffix:
  name's after "eval"), both atomically. CLIP_benchmark fields: dataset
  "jaxdistill/compositional_<split>", model "<model.kind>:<image_tower>+<text_tower>",
  pretrained "<abs workdir>@step<step>"."""
  if not (name.startswith("eval") and name.endswith(".json")):
    raise ValueError(f"evaluation results go to eval*.json, got {name!r}")
  write_json_atomic(os.path.join(workdir, name), results)
  m = config.model
  clip = clip_benchmark_result(
      results["dual"], dataset=f"jaxdistill/compositional_{results['split']}",
      model=f"{m.kind}:{m.get('image_tower', 'vit')}+{m.get('text_tower', 'transformer')}",
      pretrained=f"{os.path.abspath(workdir)}@step{step}")
  write_json_atomic(os.path.join(workdir, "clip_benchmark" + name[len("eval"):]), clip)
