"""A trained run read back from its workdir: config.json -> the network (models/build.py),
the latest checkpoint -> the student's params, tokenizer.json beside them. No recipe, teacher
or data is built, so eval, export, mining and teachers read any run the same way."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxdistill.errors import JaxDistillError
from jaxdistill.models.build import Towers, build_model, init_params, towers
from jaxdistill.store.checkpoint import Checkpointer, load_params

STUDENT = "student"          # the module a run's eval, export and mining read
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


class RunError(JaxDistillError, FileNotFoundError):
  """A workdir that holds no readable run."""


@dataclasses.dataclass(frozen=True)
class Run:
  """config: the run's resolved config; model/towers: its student network; params: the
  student's params at `step`; workdir: absolute path."""
  workdir: str
  config: ml_collections.ConfigDict
  model: nn.Module
  towers: Towers
  params: Any
  step: int

  @property
  def tokenizer_path(self) -> str:
    return os.path.join(self.workdir, TOKENIZER_FILE)


def load_run_config(workdir: str, what: str = "--workdir") -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise RunError(f"{what}={workdir!r} holds no {CONFIG_FILE}: point it at the --workdir of a "
                   "run trained with `python -m jaxdistill.main`")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, dtype: str | None = None, what: str = "--workdir") -> Run:
  """The student network and params of the latest checkpoint in `workdir` (host arrays).
  dtype: computation dtype override ("float32" | "bfloat16"); `what` names the flag in errors."""
  config = load_run_config(workdir, what)
  try:
    model = build_model(config.model, dtype)
  except JaxDistillError as e:
    raise RunError(f"{what}={workdir!r}: its {CONFIG_FILE} builds no network: {e}") from None
  expected = jax.eval_shape(lambda k: init_params(model, config.model, k), jax.random.PRNGKey(0))
  checkpointer = Checkpointer(workdir)
  step = checkpointer.latest_step()
  checkpointer.close()
  if step is None:
    raise RunError(f"{what}={workdir!r} holds no checkpoint: train it first, or point at a "
                   "finished run")
  params = load_params(workdir, {STUDENT: expected})[STUDENT]
  return Run(os.path.abspath(workdir), config, model, towers(model), params, step)
