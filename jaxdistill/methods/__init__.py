"""The recipe registry: one module per paper recipe, picked by config.method.

Each recipe module has `build(config, mesh, data, steps_per_epoch) -> Recipe` (methods/base.py),
`teacher_names(config)` (the config.teachers sections it reads) and may have
`validate(config)` (its own section's checks) and `ACCUMULATES = True` when its loss reads the
batch through per-example embeddings, so config.train.accum_steps > 1 can accumulate it
(train/accumulate.py). Only `jaxdistill.main` imports this package.
A config with a `pipeline` section (configs/leaner_faster.py) is a chain of such runs:
`validate` and `train` hand it to train/pipeline.py with the single-run functions below.
Self-supervised image pretraining (`dino.py`, configs/ssl_vit.py) is no retrieval recipe: it
trains an image-only network with `--mode=pretrain_image` (`pretrain_image` below).
"""

from __future__ import annotations

import importlib
import types

from jaxdistill.config import ConfigError, validate_teachers

RECIPES = ("loopitr", "dual", "cprd", "mcad", "leaner_faster", "unimodal_kd")
IMAGE_RECIPES = ("dino",)   # --mode=pretrain_image (pretrain_image below)


def recipe_module(config) -> types.ModuleType:
  if config.method in IMAGE_RECIPES:
    raise ConfigError(f"--config.method={config.method!r} pretrains an image-only network: run "
                      "it with --mode=pretrain_image (docs/ssl_vit.md)")
  if config.method not in RECIPES:
    raise ConfigError(f"--config.method={config.method!r} has no recipe: use one of "
                      f"{', '.join(RECIPES)} (configs/<recipe>.py sets it)")
  return importlib.import_module(f"jaxdistill.methods.{config.method}")


def validate(config) -> None:
  """The recipe's own checks and those of the teachers it reads (before anything compiles);
  for a pipeline, the structure of its stage list (each stage's run is checked in full here
  when its turn comes)."""
  from jaxdistill.train import pipeline
  if pipeline.is_pipeline(config):
    pipeline.validate_pipeline(config, RECIPES)
    return
  module = recipe_module(config)
  _require_accumulation(config, module)
  if hasattr(module, "validate"):
    module.validate(config)
  validate_teachers(config, module.teacher_names(config))


def _require_accumulation(config, module) -> None:
  """config.train.accum_steps > 1 only for a recipe whose module says ACCUMULATES."""
  accum = config.train.get("accum_steps", 1)
  if accum > 1 and not getattr(module, "ACCUMULATES", False):
    able = [r for r in RECIPES if getattr(importlib.import_module(f"jaxdistill.methods.{r}"),
                                          "ACCUMULATES", False)]
    raise ConfigError(f"--config.train.accum_steps={accum}: the {config.method} recipe's loss needs "
                      "more than per-example embeddings of the whole batch, so it cannot "
                      f"accumulate: set --config.train.accum_steps=1 (recipes that can: "
                      f"{', '.join(able)})")


def build(config, mesh, data, steps_per_epoch: int):
  """The `Recipe` of `config.method`."""
  return recipe_module(config).build(config, mesh, data, steps_per_epoch)


def train(config, workdir: str):
  """--mode=train: trains config.method's recipe in workdir and evaluates its student; a
  pipeline config runs its stages in <workdir>/<stage>/ (train/pipeline.py)."""
  from jaxdistill.train import pipeline
  from jaxdistill.train.loop import train_and_evaluate
  if pipeline.is_pipeline(config):
    return pipeline.run_pipeline(config, workdir, train, validate, RECIPES)
  return train_and_evaluate(config, workdir, build)


def pretrain_image(config, workdir: str):
  """--mode=pretrain_image: self-supervised pretraining of an image-only network (config.method
  "dino": methods/dino.py) in workdir, then a linear probe (<workdir>/probe.json)."""
  from jaxdistill.methods import dino
  from jaxdistill.train.pretrain import pretrain_and_probe
  if config.get("method") not in IMAGE_RECIPES:
    raise ConfigError(f"--mode=pretrain_image: --config.method={config.get('method')!r} is no "
                      f"image pretraining recipe: use one of {', '.join(IMAGE_RECIPES)} "
                      "(--config=configs/ssl_vit.py)")
  _require_accumulation(config, dino)
  dino.validate(config)
  return pretrain_and_probe(config, workdir, dino.build)
