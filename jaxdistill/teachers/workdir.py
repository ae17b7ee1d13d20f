"""A trained LoopITR run (paper 003) as a frozen teacher: its dual towers (embed_images /
embed_texts) and its cross encoder's ITM positive-class logit over (image, text) pairs
(match_scores, eq. 4) — the dual + cross teacher pair of MCAD (paper 001 §3) and the cross
teacher whose scores CPRD (paper 002 §3.2) distils.

The run's own config (`<workdir>/config.json`, written by train/loop.py) rebuilds the network,
so the teacher may be wider or deeper than the student; its tokenizer is `<workdir>/tokenizer.json`.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from jaxdistill.data.benchmark import TOKENIZER_FILE, prepare_benchmark
from jaxdistill.data.tokenizer import encode, load_tokenizer
from jaxdistill.evaluate.report import write_json_atomic
from jaxdistill.models.loopitr import LoopITRModel, build_model, init_params
from jaxdistill.teachers.base import Teacher, cast_params, make_teacher
from jaxdistill.train.checkpoint import Checkpointer, load_params


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: the teacher workdir must be the --workdir of "
                            "a LoopITR run trained with `python -m jaxdistill.main` "
                            "(--config.teacher.path)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def from_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                 dtype: str | None = None) -> Teacher:
  """The latest checkpoint of the LoopITR run in `workdir` as a dual + cross Teacher.

  dtype: "float32" | "bfloat16" (params stored and computed in bfloat16, outputs float32);
  default config.teacher.dtype when `config` has a teacher section, else float32. `config` is
  the student's config (only its teacher section is read); the network comes from the run's."""
  if dtype is None:
    dtype = config.teacher.dtype if config is not None and "teacher" in config else "float32"
  run = load_run_config(workdir)
  if run.get("method") != "loopitr":
    raise ValueError(f"{workdir} holds a {run.get('method')!r} run, not a LoopITR run: point "
                     "--config.teacher.path at a LoopITR --workdir")
  model_cfg = dict(run.model)
  model_cfg["dtype"] = dtype
  model = build_model(model_cfg)
  mc = run.model
  expected = jax.eval_shape(lambda k: init_params(model, k, (mc.image_size, mc.image_size, mc.channels),
                                                  mc.max_len), jax.random.PRNGKey(0))
  params = cast_params(load_params(workdir, expected), dtype)
  tokenizer = load_tokenizer(os.path.join(workdir, TOKENIZER_FILE))

  def embed_images(p, images):
    return model.apply({"params": p}, images, method=LoopITRModel.encode_image)[0]

  def embed_texts(p, ids, mask):
    return model.apply({"params": p}, ids, mask, method=LoopITRModel.encode_text)[0]

  def match_scores(p, images, ids, mask):
    _, image_tokens = model.apply({"params": p}, images, method=LoopITRModel.encode_image)
    _, text_tokens = model.apply({"params": p}, ids, mask, method=LoopITRModel.encode_text)
    return model.apply({"params": p}, text_tokens, mask, image_tokens,
                       method=LoopITRModel.match_logits)[:, 0]

  return make_teacher(f"loopitr:{os.path.basename(os.path.normpath(workdir))}", params,
                      embed_images=embed_images, embed_texts=embed_texts,
                      match_scores=match_scores,
                      tokenize=lambda texts: encode(tokenizer, list(texts), mc.max_len))


def init_workdir(config: ml_collections.ConfigDict, workdir: str, seed: int = 0):
  """Writes a LoopITR workdir with freshly initialised params (config.json, tokenizer.json, one
  checkpoint): an untrained teacher of `config`'s size, for tests and step-time benchmarks.
  Returns (benchmark, params)."""
  os.makedirs(workdir, exist_ok=True)
  bench = prepare_benchmark(config, workdir)
  config.model.vocab_size = bench.vocab_size
  model = build_model(config.model)
  mc = config.model
  params = init_params(model, jax.random.PRNGKey(seed), (mc.image_size, mc.image_size, mc.channels),
                       mc.max_len)
  checkpointer = Checkpointer(workdir)
  checkpointer.save(1, {"params": params}, {"step": 1}, wait=True)
  checkpointer.close()
  write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  return bench, params
