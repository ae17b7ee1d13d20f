"""Contrastive logits with negatives gathered from every device.

open_clip's `local_loss=True, gather_with_grad=True`: each device all-gathers the embeddings of
all devices and computes only its local rows against all columns, so memory per device is
[B / devices, B] and the global result equals the single-device logits. The gradient of the
gathered columns reaches the device that owns them through all_gather's transpose (a
reduce-scatter), with no hand-written gradient.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxdistill.losses.contrastive import contrastive_loss
from jaxdistill.parallel.mesh import BATCH_AXES


def gathered_similarity_logits(mesh: Mesh, img_emb: jax.Array, txt_emb: jax.Array,
                               temperature: jax.Array | float) -> tuple[jax.Array, jax.Array]:
  """Global similarity logits computed row-sharded (LoopITR eq. 2, CLIP with all-gathered negatives).

  img_emb, txt_emb: [B, D] global arrays, sharded (or shardable) on the batch axes of `mesh`;
  temperature: scalar tau. Works inside an outer jax.jit.
  Returns (i2t [B, B], t2i [B, B]) sharded by rows, equal to `similarity_logits`:
  i2t[i, j] = <img_i, txt_j> / tau (local images vs all texts), t2i[i, j] = <txt_i, img_j> / tau
  (local texts vs all images). Raises ValueError if B is not a multiple of the batch-axes size.
  """
  chex.assert_rank([img_emb, txt_emb], 2)
  chex.assert_equal_shape([img_emb, txt_emb])
  num_shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
  if img_emb.shape[0] % num_shards:
    raise ValueError(f"global batch {img_emb.shape[0]} is not divisible by the {num_shards} devices "
                     f"of the mesh (mesh.data * mesh.fsdp): set --config.batch_size to a multiple "
                     f"of {num_shards}")
  temperature = jnp.asarray(temperature)
  chex.assert_rank(temperature, 0)

  def local_rows(img, txt, tau):
    all_img = jax.lax.all_gather(img, BATCH_AXES, axis=0, tiled=True)   # [B, D]
    all_txt = jax.lax.all_gather(txt, BATCH_AXES, axis=0, tiled=True)   # [B, D]
    return img @ all_txt.T / tau, txt @ all_img.T / tau                 # [B_local, B] each

  rows = PartitionSpec(BATCH_AXES, None)
  return jax.shard_map(local_rows, mesh=mesh, in_specs=(rows, rows, PartitionSpec()),
                       out_specs=(rows, rows))(img_emb, txt_emb, temperature)


def gathered_contrastive_loss(mesh: Mesh, img_emb: jax.Array, txt_emb: jax.Array,
                              temperature: jax.Array | float
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ITC loss (LoopITR eq. 3, see `contrastive_loss`) on the gathered logits; pair i is the
  positive of row i. img_emb, txt_emb: [B, D]. Returns (loss, {"itc_i2t", "itc_t2i"})."""
  i2t, t2i = gathered_similarity_logits(mesh, img_emb, txt_emb, temperature)
  return contrastive_loss(i2t, t2i, jnp.arange(img_emb.shape[0], dtype=jnp.int32))
