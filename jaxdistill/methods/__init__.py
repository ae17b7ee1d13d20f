"""The recipe registry: one module per paper recipe, picked by config.method.

Each recipe module has `build(config, mesh, bench, steps_per_epoch) -> Recipe` (methods/base.py),
`teacher_names(config)` (the config.teachers sections it reads) and may have
`validate(config)` (its own section's checks). Only `jaxdistill.main` imports this package.
"""

from __future__ import annotations

import importlib
import types

from jaxdistill.config import ConfigError, validate_teachers

RECIPES = ("loopitr", "dual", "cprd", "mcad")


def recipe_module(config) -> types.ModuleType:
  if config.method not in RECIPES:
    raise ConfigError(f"--config.method={config.method!r} has no recipe: use one of "
                      f"{', '.join(RECIPES)} (configs/<recipe>.py sets it)")
  return importlib.import_module(f"jaxdistill.methods.{config.method}")


def validate(config) -> None:
  """The recipe's own checks and those of the teachers it reads (before anything compiles)."""
  module = recipe_module(config)
  if hasattr(module, "validate"):
    module.validate(config)
  validate_teachers(config, module.teacher_names(config))


def build(config, mesh, bench, steps_per_epoch: int):
  """The `Recipe` of `config.method`."""
  return recipe_module(config).build(config, mesh, bench, steps_per_epoch)


def train(config, workdir: str):
  """--mode=train: trains config.method's recipe in workdir and evaluates its student."""
  from jaxdistill.train.loop import train_and_evaluate
  return train_and_evaluate(config, workdir, build)
