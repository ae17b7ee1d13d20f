"""A trained run's workdir as a frozen teacher (`config.teachers.<name>.kind=workdir`).

A LoopITR run (paper 003) gives its dual towers (embed_images / embed_texts) and its cross
encoder's ITM positive-class logit over (image, text) pairs (match_scores, eq. 4) — the dual +
cross teacher pair of MCAD (paper 001 §3) and the cross teacher whose scores CPRD (paper 002
§3.2) distils. A dual-encoder run (dual / CPRD recipe, e.g. configs/teacher.py's `dual` preset)
gives its towers only (match_scores None). An image-only run (model.kind "image", the DINO ViT of
configs/ssl_vit.py) gives embed_images (its L2-normalised [CLS]); it has no tokenizer.json
(tokenize None), no temperature, and its embed_texts raises ImageOnlyError.

The run's network is rebuilt from its own config.json (store/run.py), so the teacher may be
wider or deeper than the student; its tokenizer is `<workdir>/tokenizer.json`.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxdistill.atomic import write_json_atomic
from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.data.tokenizer import encode, load_tokenizer
from jaxdistill.models.build import Towers, build_model, init_params
from jaxdistill.models.image import ImageNetwork
from jaxdistill.store.checkpoint import Checkpointer
from jaxdistill.store.run import STUDENT, load_run
from jaxdistill.teachers.base import Teacher, cast_params, make_teacher


def from_workdir(workdir: str, dtype: str = "float32") -> Teacher:
  """The latest checkpoint of the run in `workdir` as a Teacher: dual + cross for a LoopITR run,
  dual only for a dual-encoder run. dtype: "float32" | "bfloat16" (params stored and computed
  in bfloat16, outputs float32)."""
  run = load_run(workdir, dtype, what="teacher path")
  mc = run.config.model
  name = f"{run.config.get('method', '?')}:{os.path.basename(os.path.normpath(workdir))}"
  if isinstance(run.model, ImageNetwork):   # image-only (DINO): no tokenizer, no temperature
    return from_towers(name, run.towers, cast_params(run.params, dtype), None, None)
  tokenizer = load_tokenizer(run.tokenizer_path)
  tokenize = lambda texts: encode(tokenizer, list(texts), mc.max_len)
  return from_towers(name, run.towers, cast_params(run.params, dtype),
                     float(run.towers.temperature(run.params)), tokenize)


def from_towers(name: str, t: Towers, params, temperature: float | None,
                tokenize: Callable | None = None) -> Teacher:
  """A network's `Towers` (models/build.py) and params as a Teacher: its dual towers, and with
  a cross encoder match_scores (the ITM log-odds logit_match - logit_other, whose sigmoid is
  P(match)) and pair_outputs (P(match) = softmax of the ITM logits at the match class 0, and
  the pooled fused feature). An image-only network's towers (model.kind
  "image") give embed_images (its normalised [CLS]); its embed_texts raises ImageOnlyError."""

  def match_scores(p, images, ids, mask):
    _, image_tokens = t.embed_image(p, images)
    _, text_tokens = t.embed_text(p, ids, mask)
    logits, _ = t.match_outputs(p, image_tokens, text_tokens, mask)
    return logits[:, 0] - logits[:, 1]   # ITMHead: 0 = match; log-odds, sigmoid = P(match)

  def pair_outputs(p, images, ids, mask, image_index, text_index):
    _, image_tokens = t.embed_image(p, images)
    _, text_tokens = t.embed_text(p, ids, mask)
    logits, cls = t.match_outputs(p, image_tokens[image_index], text_tokens[text_index],
                                  mask[text_index])
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 0], cls   # ITMHead: 0 = match

  cross = t.match_scores is not None
  return make_teacher(name, params,
                      embed_images=lambda p, images: t.embed_image(p, images)[0],
                      embed_texts=lambda p, ids, mask: t.embed_text(p, ids, mask)[0],
                      match_scores=match_scores if cross else None,
                      pair_outputs=pair_outputs if cross else None,
                      temperature=temperature, tokenize=tokenize)


def init_workdir(config: ml_collections.ConfigDict, workdir: str, seed: int = 0):
  """Writes a workdir of `config` with freshly initialised params (config.json, tokenizer.json,
  one checkpoint): an untrained teacher of `config`'s size, for tests and step-time benchmarks.
  Returns (benchmark, student params)."""
  os.makedirs(workdir, exist_ok=True)
  bench = prepare_benchmark(config, workdir)
  config.model.vocab_size = bench.vocab_size
  model = build_model(config.model)
  params = init_params(model, config.model, jax.random.PRNGKey(seed))
  checkpointer = Checkpointer(workdir)
  checkpointer.save(1, {"params": {STUDENT: params}}, {"step": 1}, wait=True)
  checkpointer.close()
  write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  return bench, params
