"""The train step: one jitted pure function (state, batch) -> (state, metrics), sharded on the mesh.

State is replicated (data parallelism; the `fsdp` axis is reserved for sharding large params),
the batch is sharded on the batch axes, and nothing leaves the device inside the step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from jaxdistill.methods.base import Recipe
from jaxdistill.parallel.mesh import batch_sharding, replicated
from jaxdistill.train.state import TrainState, ema_update


def state_shardings(mesh: Mesh, state: Any) -> Any:
  """Replicated shardings for every leaf of the state (params are small enough per device)."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def make_train_step(recipe: Recipe, tx: optax.GradientTransformation, mesh: Mesh,
                    state_sharding: Any) -> Callable[[TrainState, dict, Any], tuple[TrainState, dict]]:
  """Returns the jitted step(state, batch, recipe.teacher_params). The state is donated."""

  def loss_fn(params, teacher, batch, step, recipe_state):
    """Every recipe's loss as (loss, (metrics, recipe_state)); stateless ones keep {}."""
    if recipe.init_recipe_state is not None:
      return recipe.loss_fn(params, teacher, batch, step, recipe_state)
    loss, parts = recipe.loss_fn(params, teacher, batch, step)
    return loss, (parts, recipe_state)

  def step_fn(state: TrainState, batch: dict, offline_teacher: Any):
    teacher = offline_teacher
    if recipe.ema_momentum > 0:
      teacher = state.ema_params if offline_teacher is None else (state.ema_params, offline_teacher)
    (loss, (parts, recipe_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, teacher, batch, state.step, state.recipe_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, recipe.ema_momentum) if recipe.ema_momentum > 0 \
        else state.ema_params
    metrics = dict(parts, loss=loss, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema, recipe_state=recipe_state), metrics

  data = batch_sharding(mesh)
  rep = replicated(mesh)
  teacher_sharding = None if recipe.teacher_params is None else \
      jax.tree.map(lambda _: rep, recipe.teacher_params)
  return jax.jit(step_fn, in_shardings=(state_sharding, data, teacher_sharding),
                 out_shardings=(state_sharding, rep), donate_argnums=(0,))
