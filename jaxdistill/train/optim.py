"""The optimiser, built from the trainable rules (config.trainable) and config.optim.

Rules are data, big_vision `config.schedule` style: a sequence of (regex, settings) pairs;
every param path "module/sub/.../leaf" (e.g. "student/dual/image_projection/kernel") takes the
first rule whose regex fullmatches it. settings None freezes the param (its update is exactly 0,
so it stays bit-identical; no weight decay); a dict trains it with AdamW, linear warm-up and
cosine decay (paper 003 §4.1) from config.optim with the dict's keys overridden, e.g.
`("student/dual/text_encoder/.*", {"learning_rate": 1e-5})`. A param no rule matches is an error.
Global-norm clipping (optim.grad_clip_norm > 0) sees the trainable gradients only.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import ml_collections
import optax

from jaxdistill.errors import JaxDistillError
from jaxdistill.parallel.sharding import path_str

FROZEN = "frozen"
OVERRIDABLE = ("learning_rate", "end_learning_rate", "weight_decay", "warmup_steps", "b1", "b2")


class TrainableError(JaxDistillError, ValueError):
  """A trainable rule that cannot be applied; the message names the rule or param and the fix."""


def learning_rate_schedule(optim, num_steps: int) -> optax.Schedule:
  """Linear 0 -> learning_rate over warmup_steps, cosine to end_learning_rate at num_steps."""
  warmup = min(optim["warmup_steps"], max(num_steps - 1, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim["learning_rate"], warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=optim["end_learning_rate"])


def _decay_mask(params):
  """Weight decay on matrices only (no decay on biases, LayerNorm scales or the temperature)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def param_labels(params: Any, rules: Sequence[tuple[str, Any]]) -> Any:
  """The tree of labels ("frozen" or "rule<i>") of `params` under `rules` (first match wins)."""
  compiled = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise TrainableError(f"--config.trainable[{i}]={rule!r} must be a (regex, settings) pair")
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise TrainableError(f"--config.trainable[{i}] regex {rule[0]!r} is not valid: {e}") from None

  def label(path, _):
    name = path_str(path)
    for i, (pattern, settings) in enumerate(compiled):
      if pattern.fullmatch(name):
        return FROZEN if settings is None else f"rule{i}"
    raise TrainableError(f"param {name} matches no --config.trainable rule: add one (e.g. "
                         "('.*', {}) last to train everything else with config.optim)")
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim: ml_collections.ConfigDict, rules: Sequence[tuple[str, Any]],
                   params: Any, num_steps: int) -> optax.GradientTransformation:
  """AdamW per trainable rule, zero updates for frozen params; `params` may be abstract."""
  labels = param_labels(params, rules)
  transforms = {FROZEN: optax.set_to_zero()}
  for i, (_, settings) in enumerate(rules):
    if settings is None:
      continue
    unknown = sorted(set(settings) - set(OVERRIDABLE))
    if unknown:
      raise TrainableError(f"--config.trainable[{i}] sets {unknown}: a rule may override only "
                           f"{', '.join(OVERRIDABLE)} of config.optim")
    o = {**{k: optim[k] for k in OVERRIDABLE}, **settings}
    transforms[f"rule{i}"] = optax.adamw(learning_rate_schedule(o, num_steps), b1=o["b1"],
                                         b2=o["b2"], weight_decay=o["weight_decay"],
                                         mask=_decay_mask)
  used = set(jax.tree.leaves(labels))
  tx = optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels)
  if optim.grad_clip_norm > 0:
    frozen = jax.tree.map(lambda l: l == FROZEN, labels)
    tx = optax.chain(optax.masked(optax.set_to_zero(), frozen),
                     optax.clip_by_global_norm(optim.grad_clip_norm), tx)
  return tx


def trainable_mask(params: Any, rules: Sequence[tuple[str, Any]]) -> Any:
  """bool tree: True where the param trains (for metrics such as the gradient norm)."""
  return jax.tree.map(lambda l: l != FROZEN, param_labels(params, rules))
