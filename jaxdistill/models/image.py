"""An image-only network (`model.kind = "image"`): the image tower of models/towers.py and
nothing else -- no text tower, no projection, no temperature.

It is what self-supervised pretraining trains (methods/dino.py, docs/ssl_vit.md: DINO on the
Fashion-MNIST grids); its run is read back like any other (store/run.py `load_run`), serves as a
frozen image teacher (teachers/workdir.py: `embed_images` only) and lends its tower to another
run's image encoder through `init_from` (the param paths are `image_encoder/...`, as in
models/dual.py, so `("student/image_encoder/", "student/image_encoder/")` maps it).

encode_image(images [B, H, W, C]) -> (the tower's [CLS] token (token 0) L2-normalised, float32
[B, D]; tokens [B, 1 + P, D]).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.errors import JaxDistillError
from jaxdistill.models.dual import l2_normalize


class ImageOnlyError(JaxDistillError, ValueError):
  """A text-side function (text tower, ITC temperature) asked of an image-only network."""


def image_only_error(what: str) -> ImageOnlyError:
  return ImageOnlyError(
      f"{what}: this network is image-only (model.kind='image', e.g. the DINO-pretrained ViT of "
      "configs/ssl_vit.py): it has no text tower and no temperature; use it where only images "
      "are embedded (a teacher's embed_images, init_from of an image tower)")


class ImageNetwork(nn.Module):
  """image_encoder: images [B, H, W, C] -> tokens [B, 1 + P, D] ([CLS] first), e.g. ViT."""
  image_encoder: nn.Module

  def __call__(self, images: jax.Array, deterministic: bool = True):
    return self.encode_image(images, deterministic=deterministic)

  def encode_image(self, images: jax.Array,
                   deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, C] -> (emb float32 [B, D] unit-norm [CLS], tokens [B, 1 + P, D])."""
    tokens = self.image_encoder(images, deterministic=deterministic)
    chex.assert_rank(tokens, 3)
    return l2_normalize(tokens[:, 0].astype(jnp.float32)), tokens
