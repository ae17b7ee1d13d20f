"""Pieces shared by the checkpoint-layout modules: activations by their Hugging Face names."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact erf GELU (torch nn.GELU())
    "gelu_new": lambda x: nn.gelu(x, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "tanh": jnp.tanh,  # ViT's pooler_act
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Hugging Face `hidden_act` name -> function."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}: supported are {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]
