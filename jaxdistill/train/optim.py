"""Optimiser: AdamW with linear warm-up then cosine decay (paper 003 §4.1)."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear 0 -> learning_rate over warmup_steps, cosine to end_learning_rate at num_steps."""
  warmup = min(optim.warmup_steps, max(num_steps - 1, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=optim.end_learning_rate)


def _decay_mask(params):
  """Weight decay on matrices only (no decay on biases, LayerNorm scales or the temperature)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  chain = []
  if optim.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  chain.append(optax.adamw(learning_rate_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay, mask=_decay_mask))
  return optax.chain(*chain)
