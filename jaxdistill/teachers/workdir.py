"""A trained run's workdir as a frozen teacher (`--config.teacher.kind=workdir`).

A LoopITR run (paper 003) gives its dual towers (embed_images / embed_texts) and its cross
encoder's ITM positive-class logit over (image, text) pairs (match_scores, eq. 4) — the dual +
cross teacher pair of MCAD (paper 001 §3) and the cross teacher whose scores CPRD (paper 002
§3.2) distils. A dual-encoder run (the dual or CPRD recipe, e.g. configs/teacher.py's `dual`
preset) gives its towers only (match_scores None).

The run's own config (`<workdir>/config.json`, written by train/loop.py) rebuilds the network,
so the teacher may be wider or deeper than the student; its tokenizer is `<workdir>/tokenizer.json`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from jaxdistill.data.benchmark import TOKENIZER_FILE, prepare_benchmark
from jaxdistill.data.tokenizer import encode, load_tokenizer
from jaxdistill.evaluate.report import write_json_atomic
from jaxdistill.methods.base import dual_towers
from jaxdistill.methods.dual import build_model as build_dual_model, param_initializer
from jaxdistill.models.loopitr import LoopITRModel, build_model, init_params
from jaxdistill.teachers.base import Teacher, cast_params, make_teacher
from jaxdistill.train.checkpoint import Checkpointer, load_params


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: the teacher workdir must be the --workdir of "
                            "a run trained with `python -m jaxdistill.main` "
                            "(--config.teacher.path)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


DUAL_METHODS = ("dual", "cprd")   # recipes whose model is a DualEncoder (methods/dual.py)


def from_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                 dtype: str | None = None) -> Teacher:
  """The latest checkpoint of the run in `workdir` as a Teacher: dual + cross for a LoopITR run,
  dual only for a dual-encoder run (DUAL_METHODS).

  dtype: "float32" | "bfloat16" (params stored and computed in bfloat16, outputs float32);
  default config.teacher.dtype when `config` has a teacher section, else float32. `config` is
  the student's config (only its teacher section is read); the network comes from the run's."""
  if dtype is None:
    dtype = config.teacher.dtype if config is not None and "teacher" in config else "float32"
  run = load_run_config(workdir)
  method = run.get("method")
  if method != "loopitr" and method not in DUAL_METHODS:
    raise ValueError(f"{workdir} holds a {method!r} run: a teacher workdir must hold a LoopITR "
                     f"run (dual + cross) or a {' / '.join(DUAL_METHODS)} run (dual): fix "
                     "--config.teacher.path")
  mc = run.model
  tokenizer = load_tokenizer(os.path.join(workdir, TOKENIZER_FILE))
  tokenize = lambda texts: encode(tokenizer, list(texts), mc.max_len)
  name = f"{method}:{os.path.basename(os.path.normpath(workdir))}"
  if method in DUAL_METHODS:
    model = build_dual_model(mc, jnp.dtype(dtype))
    expected = jax.eval_shape(param_initializer(model, mc), jax.random.PRNGKey(0))
    params = cast_params(load_params(workdir, expected), dtype)
    image_tower, text_tower = dual_towers(model)
    return make_teacher(name, params, embed_images=lambda p, images: image_tower(p, images)[0],
                        embed_texts=lambda p, ids, mask: text_tower(p, ids, mask)[0],
                        tokenize=tokenize)

  model_cfg = dict(mc)
  model_cfg["dtype"] = dtype
  model = build_model(model_cfg)
  expected = jax.eval_shape(lambda k: init_params(model, k, (mc.image_size, mc.image_size, mc.channels),
                                                  mc.max_len), jax.random.PRNGKey(0))
  params = cast_params(load_params(workdir, expected), dtype)

  def embed_images(p, images):
    return model.apply({"params": p}, images, method=LoopITRModel.encode_image)[0]

  def embed_texts(p, ids, mask):
    return model.apply({"params": p}, ids, mask, method=LoopITRModel.encode_text)[0]

  def match_scores(p, images, ids, mask):
    _, image_tokens = model.apply({"params": p}, images, method=LoopITRModel.encode_image)
    _, text_tokens = model.apply({"params": p}, ids, mask, method=LoopITRModel.encode_text)
    return model.apply({"params": p}, text_tokens, mask, image_tokens,
                       method=LoopITRModel.match_logits)[:, 0]

  return make_teacher(name, params, embed_images=embed_images, embed_texts=embed_texts,
                      match_scores=match_scores, tokenize=tokenize)


def init_workdir(config: ml_collections.ConfigDict, workdir: str, seed: int = 0):
  """Writes a workdir of `config.method` (LoopITR or a DUAL_METHODS recipe) with freshly
  initialised params (config.json, tokenizer.json, one checkpoint): an untrained teacher of
  `config`'s size, for tests and step-time benchmarks. Returns (benchmark, params)."""
  os.makedirs(workdir, exist_ok=True)
  bench = prepare_benchmark(config, workdir)
  config.model.vocab_size = bench.vocab_size
  mc = config.model
  key = jax.random.PRNGKey(seed)
  if config.method in DUAL_METHODS:
    params = param_initializer(build_dual_model(mc), mc)(key)
  else:
    params = init_params(build_model(mc), key, (mc.image_size, mc.image_size, mc.channels), mc.max_len)
  checkpointer = Checkpointer(workdir)
  checkpointer.save(1, {"params": params}, {"step": 1}, wait=True)
  checkpointer.close()
  write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  return bench, params
