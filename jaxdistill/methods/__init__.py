"""One module per paper recipe; `build(config, mesh, steps_per_epoch)` picks by config.method."""

from __future__ import annotations

import importlib

RECIPES = ("loopitr", "dual", "cprd")


def build(config, mesh, steps_per_epoch: int):
  """The `Recipe` of `config.method` (see methods/base.py)."""
  if config.method not in RECIPES:
    raise ValueError(f"--config.method={config.method!r} is unknown: use one of {', '.join(RECIPES)}")
  return importlib.import_module(f"jaxdistill.methods.{config.method}").build(
      config, mesh, steps_per_epoch)
