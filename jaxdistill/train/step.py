"""The train step: one jitted pure function (state, batch, frozen) -> (state, metrics).

Every recipe's loss has one signature (methods/base.py `LossFn`):
  loss_fn(params, frozen, extra, batch, rng, step) -> (loss, metrics, extra)
params = {module: tree} (differentiated); frozen = {teacher name: params, recipe data...}
plus "ema": {module: tree} when the recipe keeps momentum copies (never differentiated);
extra = the recipe's carry (queues); rng = fold_in(state.rng, step), the step's key (dropout,
masks, random negatives), so a resumed run draws what an uninterrupted one would.

Shardings come from one place (parallel/sharding.py rules, applied by the trainer) and are
given here as in/out shardings; the state is donated. Nothing leaves the device in the step.

A loss that is an `AccumulableLoss` (train/accumulate.py) with steps > 1 (config.train.accum_steps)
is differentiated in that many microbatches through its embedding cache: the same loss and
gradients as the whole batch at once, at one microbatch's activation memory.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from jaxdistill.train.accumulate import AccumulableLoss, accumulated_value_and_grad
from jaxdistill.train.state import TrainState, ema_update

# config.model.remat (models/layers.remat_block) keeps XLA from merging a block's backward-pass
# recomputation with its forward pass (CSE) by optimization barriers; XLA:CPU strips them before
# CSE (its cse_barrier_expander pass), which silently undoes the remat. The step keeps them:
# without remat the step holds no barrier and this changes nothing (docs/architecture.md). Applied
# on CPU only, where it was measured (benchmarks/memory_levers.py); GPU/TPU are not measured yet.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, ema: dict[str, float],
                    trainable: Any, shardings: dict) -> Callable:
  """Returns the jitted step(state, batch, frozen) -> (state, metrics).

  ema: {module: momentum} of the modules with an EMA copy; trainable: bool tree over params
  (the gradient norm is reported over trainable params); shardings: {"state", "batch",
  "frozen", "metrics"} NamedSharding trees (parallel/sharding.py). loss_fn: an AccumulableLoss
  with steps > 1 accumulates its gradient over that many microbatches of the batch (the batch's
  leading dim must divide into them, each a multiple of the batch-sharded devices)."""
  accumulate = isinstance(loss_fn, AccumulableLoss) and loss_fn.steps > 1

  def objective(params, frozen, extra, batch, rng, step):
    loss, metrics, extra = loss_fn(params, frozen, extra, batch, rng, step)
    return loss, (metrics, extra)

  def step_fn(state: TrainState, batch: dict, frozen: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    frozen = dict(frozen, ema=state.ema) if ema else frozen
    if accumulate:
      (loss, (metrics, extra)), grads = accumulated_value_and_grad(
          loss_fn, state.params, frozen, state.extra, batch, rng, state.step, shardings["batch"])
    else:
      (loss, (metrics, extra)), grads = jax.value_and_grad(objective, has_aux=True)(
          state.params, frozen, state.extra, batch, rng, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_ema = {m: ema_update(state.ema[m], params[m], momentum) for m, momentum in ema.items()}
    grad_norm = optax.tree.norm(jax.tree.leaves(
        jax.tree.map(lambda g, t: g if t else None, grads, trainable)))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=new_ema,
                         extra=extra), metrics

  return jax.jit(step_fn, in_shardings=(shardings["state"], shardings["batch"], shardings["frozen"]),
                 out_shardings=(shardings["state"], shardings["metrics"]), donate_argnums=(0,),
                 compiler_options=CPU_COMPILER_OPTIONS if _platform(shardings) == "cpu" else None)


def _platform(shardings: dict) -> str:
  """The platform the step compiles for: its mesh's devices' (an AOT compile for another
  platform's topology, benchmarks/scaling.py, is not the default backend's)."""
  return shardings["metrics"].mesh.devices.flat[0].platform
