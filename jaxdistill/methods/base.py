"""What every recipe hands the trainer: named modules, one pure loss, frozen inputs, EMA, carry.

The trainer (train/loop.py) does the rest from the config, as data: initialisation (resume >
config.init_from > random), the optimiser from config.trainable, the shardings from
config.sharding, the jitted step, evaluation of the "student" module's towers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from jaxdistill.config import ConfigError
from jaxdistill.models.build import Towers, build_model, init_params
from jaxdistill.store.run import STUDENT  # noqa: F401  (recipes name their student module so)
from jaxdistill.train.accumulate import AccumulableLoss

# loss_fn(params {module: tree}, frozen {name: tree, "ema": {module: tree}}, extra, batch,
#         rng [2] uint32, step int32 []) -> (loss [], metrics {name: []}, extra)
LossFn = Callable[..., tuple[jax.Array, dict, Any]]


@dataclasses.dataclass(frozen=True)
class Module:
  """A trainable network: its flax module and init(key) -> params tree."""
  model: nn.Module
  init: Callable[[jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A paper recipe on the training contract.

  modules: {name: Module}, the trainable networks; "student" is the one evaluated and exported.
  loss_fn: see LossFn. A loss that reads the batch only through per-example embeddings may be
    an `AccumulableLoss` (train/accumulate.py, built with `accumulable` below): with
    config.train.accum_steps > 1 the step then accumulates the whole batch's gradient over
    microbatches through an embedding cache (dual; LoopITR's ITC warm-up). Other losses are
    plain functions and their recipes refuse accum_steps > 1 (no ACCUMULATES in the module).
  frozen: {name: tree} of device-placeable arrays the loss reads but never differentiates:
    teachers' params by their config.teachers name, recipe data (CPRD's train images or
    similarity bank). The trainer shards them with the config.sharding rules (paths
    "frozen/<name>/...") and passes them to every step.
  ema: {module: momentum}: modules whose exponential moving average the state keeps; the loss
    reads them as frozen["ema"][module].
  init_extra: () -> the carry's initial value (e.g. feature queues), or None for {}.
  warmup: (steps, loss_fn) or None: the loss of the first `steps` steps, compiled as its own
    step, so a warm-up that uses part of the objective skips the work of the rest (LoopITR's
    ITC-only warm-up runs no cross encoder); `loss_fn` from step `steps` on. It may be an
    AccumulableLoss whatever `loss_fn` is.
  batch_features: {teacher name: teacher cache directory} of cached teachers (kind "cache"):
    the trainer adds their features of each example to the batch as <name>_image_emb [B, E],
    <name>_text_emb [B, E], <name>_valid [B] (teachers/cache.py add_cached_features).
  batch_texts: {teacher name: tokenize(texts) -> (ids, mask)} of teachers that read captions in
    their own vocabulary: the input pipeline adds each caption's <name>_text_ids /
    <name>_text_mask [B, L_name] beside the student's text_ids / text_mask.
  """
  name: str
  modules: Mapping[str, Module]
  loss_fn: LossFn
  frozen: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  ema: Mapping[str, float] = dataclasses.field(default_factory=dict)
  init_extra: Callable[[], Any] | None = None
  warmup: tuple[int, LossFn] | None = None
  batch_features: Mapping[str, str] = dataclasses.field(default_factory=dict)
  batch_texts: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


_DROPOUT_STREAM = 0x0D0   # folded into the step key for dropout, apart from the recipe's own keys


def dropout_rngs(config, rng: jax.Array, call: int) -> dict | None:
  """Flax `rngs` for the call-th network application of a step: {"dropout": key} when
  config.model.dropout_rate > 0 (training mode), else None (deterministic)."""
  if config.model.dropout_rate <= 0:
    return None
  return {"dropout": jax.random.fold_in(jax.random.fold_in(rng, _DROPOUT_STREAM), call)}


class PairEmbedding(NamedTuple):
  """The student's towers on one batch: unit-norm embeddings image / text [B, E], the towers'
  token outputs image_tokens [B, Ti, Di] / text_tokens [B, L, Dt], the temperature []."""
  image: jax.Array
  image_tokens: jax.Array
  text: jax.Array
  text_tokens: jax.Array
  temperature: jax.Array


def embed_pair(config, student: Towers, params, batch, rng: jax.Array) -> PairEmbedding:
  """Both towers of `student` (params: its tree) on batch image [B,H,W,C], text_ids / text_mask
  [B,L], with dropout streams 0 (image) and 1 (text) of `rng`, and its learned temperature: the
  forward every contrastive recipe starts with."""
  image, image_tokens = student.embed_image(params, batch["image"],
                                            rngs=dropout_rngs(config, rng, 0))
  text, text_tokens = student.embed_text(params, batch["text_ids"], batch["text_mask"],
                                         rngs=dropout_rngs(config, rng, 1))
  return PairEmbedding(image, image_tokens, text, text_tokens, student.temperature(params))


def embed_mined(config, student: Towers, params, batch, rng: jax.Array, text: bool = True,
                image: bool = True) -> dict:
  """The mined negatives of a batch through `student` (params: its tree): "text" [b, k, E] from
  neg_text_ids / neg_text_mask [b, k, L] (dropout stream 2 of `rng`) and "image" [b, k, E] from
  neg_image [b, k, H, W, C] (stream 3), each only when asked for."""
  out = {}
  if text:
    b, k, length = batch["neg_text_ids"].shape
    out["text"] = student.embed_text(
        params, batch["neg_text_ids"].reshape(b * k, length),
        batch["neg_text_mask"].reshape(b * k, length),
        rngs=dropout_rngs(config, rng, 2))[0].reshape(b, k, -1)
  if image:
    b, k = batch["neg_image"].shape[:2]
    out["image"] = student.embed_image(
        params, batch["neg_image"].reshape(b * k, *batch["neg_image"].shape[2:]),
        rngs=dropout_rngs(config, rng, 3))[0].reshape(b, k, -1)
  return out


def accumulable(config, embed: Callable, loss_from_embeddings: Callable,
                features: Callable | None = None) -> AccumulableLoss:
  """The LossFn loss_from_embeddings(params, frozen, extra, embed(params, frozen, batch, rng),
  batch, rng, step), accumulated over config.train.accum_steps microbatches by the step
  (train/accumulate.py: `embed` maps a batch to per-example embeddings [b, ...]; `features`
  (frozen, batch) -> {name: [b, ...]}: a frozen teacher's outputs, added to the batch once)."""
  return AccumulableLoss(embed, loss_from_embeddings, int(config.train.get("accum_steps", 1)),
                         features)


def student_module(config) -> Module:
  """The "student" module built from config.model (models/build.py)."""
  model = build_model(config.model)
  return Module(model, lambda key: init_params(model, config.model, key))


def same_tokenizer(teacher, data) -> bool:
  """Whether `teacher` reads the student's token ids: it has no vocabulary of its own
  (teacher.tokenize None) or tokenizes train captions (data.train_sample) as the student does."""
  if teacher.tokenize is None:
    return True
  sample, ids, mask = data.train_sample(32)
  t_ids, t_mask = teacher.tokenize(sample)
  width = min(t_ids.shape[1], ids.shape[1])
  return (np.array_equal(t_ids[:, :width] * t_mask[:, :width], ids[:, :width])
          and int(t_mask.sum()) == int(mask.sum()))


def check_teacher_tokenizer(method: str, name: str, teacher, data) -> None:
  """A teacher that reads the student's token ids must tokenize as the student does
  (`same_tokenizer`), else ConfigError."""
  if not same_tokenizer(teacher, data):
    raise ConfigError(f"{method}: teacher {name!r} ({teacher.name}) tokenizes captions differently "
                      "from the student (--config.data.tokenizer): train the teacher with the "
                      "student's tokenizer, or give the student the teacher's")
