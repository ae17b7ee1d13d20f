"""What every recipe hands the trainer: a model, its params, one pure loss and the eval towers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

from jaxdistill.models.dual import DualEncoder

# (params, teacher_params, batch, step) -> (loss scalar, metrics dict of scalars); a recipe with
# init_recipe_state gets the recipe state as a fifth argument and returns
# (loss, (metrics, new recipe state)).
LossFn = Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A paper recipe, ready for `train.step.make_train_step` and `evaluate.run`.

  embed_image(params, images [B,H,W,C]) -> (emb [B,E] L2-normalised, tokens [B,M,D])
  embed_text(params, ids [B,L], mask [B,L]) -> (emb [B,E], tokens [B,L,D])
  match_scores(params, image_tokens [P,M,D], text_tokens [P,L,D], text_mask [P,L]) -> [P]
    (cross encoder's positive-class logit), or None for recipes without a cross encoder.
  teacher_params: frozen params of an offline teacher, or None.
  ema_momentum: > 0 when the recipe keeps an EMA of its params in the TrainState; loss_fn then
    gets the EMA params as its teacher argument, or the pair (ema_params, teacher_params) when
    the recipe has both (a momentum encoder beside a frozen teacher, CPRD).
  init_recipe_state: () -> pytree of arrays the recipe carries from step to step (e.g. CPRD's
    feature queues), or None. It lives in TrainState.recipe_state (replicated, checkpointed)
    and loss_fn takes and returns it (see LossFn).
  """
  name: str
  model: nn.Module
  init_params: Callable[[jax.Array], Any]
  loss_fn: LossFn
  embed_image: Callable
  embed_text: Callable
  match_scores: Callable | None
  teacher_params: Any = None
  ema_momentum: float = 0.0
  init_recipe_state: Callable[[], Any] | None = None


def dual_towers(model: DualEncoder) -> tuple[Callable, Callable]:
  """(embed_image, embed_text) of a DualEncoder in the Recipe's signatures (see Recipe)."""

  def embed_image(params, images):
    return model.apply({"params": params}, images, method=DualEncoder.encode_image)

  def embed_text(params, ids, mask):
    return model.apply({"params": params}, ids, mask, method=DualEncoder.encode_text)

  return embed_image, embed_text
