"""TrainState: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """step: int32 []; rng: the run's PRNG key (uint32 [2]), each step's key is
  fold_in(rng, step); params: {module name: tree}; ema: {module name: tree}, exponential
  moving averages of the modules the recipe asks for (momentum encoders / teachers), or {};
  opt_state: optax state of the whole params dict; extra: what a recipe carries between
  steps (feature queues, counters), or {}."""
  step: jax.Array
  rng: jax.Array
  params: Any
  ema: Any
  opt_state: Any
  extra: Any


def create_train_state(params: dict, tx: optax.GradientTransformation, rng: jax.Array,
                       ema_modules: tuple[str, ...] = (), extra: Any = None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, params=params,
                    ema={m: jax.tree.map(jnp.copy, params[m]) for m in ema_modules},
                    opt_state=tx.init(params), extra={} if extra is None else extra)


def ema_update(ema_params, params, momentum: float):
  """ema <- momentum * ema + (1 - momentum) * params (ALBEF / MoCo momentum encoders)."""
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)
