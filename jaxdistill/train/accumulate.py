"""Gradient accumulation that keeps the contrastive batch: the embedding cache (GradCache, Gao et
al. 2021; open_clip's --accum-freq).

Accumulating per-microbatch gradients of an InfoNCE loss changes the loss: each microbatch only
sees its own negatives. A loss that reads the batch only through per-example embeddings splits
instead as  loss = loss_from_embeddings(params, embed(params, microbatch_1) ++ ... ++
embed(params, microbatch_n)), and its gradient is exact at the memory of one microbatch's
network activations:
  1. embed every microbatch without gradients (the cache: embeddings only, no activations);
  2. the full-batch loss on the cached embeddings, differentiated w.r.t. the params (terms that
     read params directly, e.g. the temperature) and w.r.t. the embeddings;
  3. each microbatch embedded again, with gradients, and the cached embedding-gradients pulled
     back through it (vjp); the param gradients are summed.
A frozen network's per-example outputs (a teacher's embeddings) are `features`: computed once
per microbatch in step 1 and handed to the loss as batch fields, never recomputed in step 3.
Steps 1 and 3 are `lax.scan`s over the microbatches (the compiled step does not grow with their
number). Microbatch j holds the examples j, j + n, j + 2n, ... of the global batch, so each keeps
the batch sharded over the data axes with no data movement (every device's rows are contiguous).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxdistill.parallel.mesh import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class AccumulableLoss:
  """A contract loss (methods/base.py LossFn) that reads the batch through per-example embeddings.

  embed(params, frozen, batch, rng) -> embeddings: a pytree of arrays [b, ...] (one row per
    example of `batch`), deterministic given rng (the recompute of step 3 must match step 1);
  loss_from_embeddings(params, frozen, extra, embeddings, batch, rng, step) -> (loss, metrics,
    extra): embeddings of the whole batch [B, ...], the whole batch (e.g. its ids) with the
    fields of `features`;
  steps: microbatches per step (config.train.accum_steps); 1 = the plain full-batch gradient;
  features(frozen, batch) -> {name: [b, ...]} or None: outputs that need no gradient (a frozen
    teacher's embeddings), added to the batch the loss reads.
  Called as a LossFn it is loss_from_embeddings(embed(batch)) on the whole batch."""
  embed: Callable[..., Any]
  loss_from_embeddings: Callable[..., tuple[jax.Array, dict, Any]]
  steps: int = 1
  features: Callable[..., dict] | None = None

  def with_features(self, frozen, batch):
    """`batch` with the fields of features(frozen, batch) (no gradient flows into them)."""
    if self.features is None:
      return batch
    return {**batch, **jax.lax.stop_gradient(self.features(frozen, batch))}

  def __call__(self, params, frozen, extra, batch, rng, step):
    batch = self.with_features(frozen, batch)
    embeddings = self.embed(params, frozen, batch, rng)
    return self.loss_from_embeddings(params, frozen, extra, embeddings, batch, rng, step)


def _constrain(tree, sharding):
  """with_sharding_constraint of `tree` to `sharding` (a NamedSharding or a tree of them); no-op
  for None."""
  return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding)


def split_microbatches(tree, steps: int):
  """[B, ...] leaves -> [steps, B / steps, ...]: microbatch j = rows j, j + steps, j + 2 steps..."""
  def split(x):
    if x.shape[0] % steps:
      raise ValueError(f"batch of {x.shape[0]} rows is not divisible into {steps} microbatches: "
                       "set --config.train.accum_steps to a divisor of --config.batch_size")
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def join_microbatches(tree):
  """The inverse of split_microbatches: [steps, b, ...] -> [steps * b, ...] in the batch's order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def accumulated_value_and_grad(loss: AccumulableLoss, params, frozen, extra, batch, rng, step,
                               batch_shardings=None):
  """((loss, (metrics, extra)), grads) of `loss` on `batch` in loss.steps microbatches: the value
  and the gradient of the full-batch loss (up to float rounding). Microbatch j embeds with
  rng fold_in(rng, j) (dropout); the loss reads the step's rng. batch_shardings: the batch's
  NamedSharding tree (train/step.py): microbatches and embeddings are kept sharded on its mesh's
  batch axes."""
  steps = loss.steps
  micro_sharding = rows = stacked_rows = None
  if batch_shardings is not None and jax.tree.leaves(batch_shardings):
    mesh = jax.tree.leaves(batch_shardings)[0].mesh
    micro_sharding = jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)),
                                  batch_shardings)
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    stacked_rows = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
  micro = _constrain(split_microbatches(batch, steps), micro_sharding)
  index = jnp.arange(steps)

  def embed(p, microbatch, j):
    microbatch = _constrain(microbatch, batch_shardings)
    embeddings = loss.embed(p, frozen, microbatch, jax.random.fold_in(rng, j))
    return embeddings if rows is None else jax.tree.map(lambda x: _constrain(x, rows), embeddings)

  # 1. The cache: every microbatch's embeddings (and frozen features), no gradients.
  def cache(microbatch, j):
    features = {} if loss.features is None else jax.lax.stop_gradient(
        loss.features(frozen, _constrain(microbatch, batch_shardings)))
    return embed(params, microbatch, j), features

  _, (cached, features) = jax.lax.scan(lambda c, xs: (c, cache(*xs)), None, (micro, index))
  embeddings, features = join_microbatches(cached), join_microbatches(features)
  if rows is not None:
    embeddings, features = jax.tree.map(lambda x: _constrain(x, rows), (embeddings, features))
  batch = {**batch, **features}

  # 2. The full-batch loss on the cache: its direct param gradient and the embeddings' gradient.
  def objective(p, e):
    value, metrics, new_extra = loss.loss_from_embeddings(p, frozen, extra, e, batch, rng, step)
    return value, (metrics, new_extra)

  (value, aux), (direct, embedding_grads) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True)(params, embeddings)
  embedding_grads = split_microbatches(embedding_grads, steps)
  if stacked_rows is not None:
    embedding_grads = jax.tree.map(lambda x: _constrain(x, stacked_rows), embedding_grads)

  # 3. Each microbatch again, with gradients: its embeddings' cached gradient pulled back.
  def pull_back(grads, xs):
    microbatch, cotangent, j = xs
    _, vjp = jax.vjp(lambda p: embed(p, microbatch, j), params)
    return jax.tree.map(jnp.add, grads, vjp(cotangent)[0]), None

  grads, _ = jax.lax.scan(pull_back, direct, (micro, embedding_grads, index))
  return (value, aux), grads
