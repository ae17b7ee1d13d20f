"""TrainState: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params: model params; opt_state: optax state;
  ema_params: exponential moving average of params (momentum teachers / encoders), or {};
  recipe_state: what a recipe carries between steps (e.g. feature queues), or {}."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  recipe_state: Any = flax.struct.field(default_factory=dict)


def create_train_state(params, tx: optax.GradientTransformation, *, with_ema: bool,
                       recipe_state: Any = None) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if with_ema else {},
      recipe_state={} if recipe_state is None else recipe_state,
  )


def ema_update(ema_params, params, momentum: float):
  """ema <- momentum * ema + (1 - momentum) * params (ALBEF / MoCo momentum encoders)."""
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)
