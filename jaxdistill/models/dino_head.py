"""DINO's projection head (Caron et al. 2021, §3.1 "Network architecture" and Appendix): a
3-layer MLP (hidden width, GELU) to a bottleneck, L2 normalisation, then a weight-normalised
linear layer without bias to K prototype logits.

    h = Dense(bottleneck)(gelu(Dense(hidden)(gelu(Dense(hidden)(x)))))
    z = h / ||h||
    logits = z @ (V / ||V||_col)      (weight norm with its gain fixed to 1: DINO's
                                       norm_last_layer=True, so each prototype is a unit vector)

x: the backbone's [CLS] token [B, D] (after the ViT's final LayerNorm, unnormalised).
The head exists only during pretraining (methods/dino.py); downstream users read the backbone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.dual import l2_normalize


class DINOHead(nn.Module):
  """[B, D] -> prototype logits float32 [B, num_prototypes] (each in [-1, 1]: a cosine)."""
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_prototypes: int = 65536
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.truncated_normal(stddev=0.02)   # DINO's trunc_normal_(std=.02)
    dense = lambda width, name: nn.Dense(width, dtype=self.dtype, kernel_init=init,
                                         bias_init=nn.initializers.zeros, name=name)
    x = nn.gelu(dense(self.hidden_dim, "fc1")(x), approximate=False)
    x = nn.gelu(dense(self.hidden_dim, "fc2")(x), approximate=False)
    x = dense(self.bottleneck_dim, "fc3")(x)
    z = l2_normalize(x.astype(jnp.float32))
    v = self.param("prototypes", nn.initializers.lecun_normal(),
                   (self.bottleneck_dim, self.num_prototypes))
    w = v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=0, keepdims=True), 1e-12))
    return z @ w
