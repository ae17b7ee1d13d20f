"""Initial params: resume > config.init_from > random (the trainer calls `apply_init_from`).

config.init_from is a sequence of sources, applied in order over the random init:
  {"source": "workdir:PATH"      the latest checkpoint of an earlier run (a previous stage),
                                 its params {module: tree} as paths "module/sub/.../leaf";
             | "pretrained:PATH" a local Hugging Face checkpoint read by pretrained/ into the
                                 layout of a models/ tower ("architecture": bert |
                                 efficientnet_lite0 | hf_vit),
   "layers": ""                  all layers | "first:N" | "last:N" | "i,j,k": keep those
                                 `layer_<i>` subtrees of the source, renumbered 0..n-1,
   "mapping": ((dst_regex, src_prefix), ...)}
Each destination param path that `dst_regex` matches (re.match, from the start) takes the source
leaf at src_prefix + (the rest of the path after the match): ("student/dual/text_encoder/", "")
puts a whole text tower at its place. A matched destination with no source leaf, a shape or
dtype mismatch, or a rule that matches nothing raises InitFromError naming the path and fix.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np

from jaxdistill.errors import JaxDistillError
from jaxdistill.parallel.sharding import path_str
from jaxdistill.pretrained.checkpoint import CheckpointError, layer_indices
from jaxdistill.pretrained.towers import load_tower_params
from jaxdistill.store.checkpoint import Checkpointer

LAYER = re.compile(r"(^|/)layer_(\d+)(?=/)")


class InitFromError(JaxDistillError, ValueError):
  """An init_from source or mapping that cannot initialise this run's params."""


def flatten(tree: Any) -> dict[str, Any]:
  """{"a/b/c": leaf} of a nested params tree."""
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def select_layers(flat: dict[str, Any], spec: str, where: str) -> dict[str, Any]:
  """Keeps the `layer_<i>` subtrees named by spec ("first:N" | "last:N" | "i,j,k"), renumbered
  0..n-1; leaves outside any layer (embeddings, final norms) are kept as they are."""
  if not spec:
    return flat
  present = sorted({int(m.group(2)) for k in flat for m in [LAYER.search(k)] if m})
  if present != list(range(len(present))):
    raise InitFromError(f"init_from {where}: its layers are numbered {present}, not 0..n-1: "
                        "select layers only from a source whose layers are layer_0, layer_1, ...")
  try:
    chosen = layer_indices(spec, len(present))
  except CheckpointError as e:
    raise InitFromError(f"init_from {where}: {e}") from None
  renumber = {old: new for new, old in enumerate(chosen)}
  out = {}
  for key, value in flat.items():
    m = LAYER.search(key)
    if m is None:
      out[key] = value
    elif int(m.group(2)) in renumber:
      out[key[:m.start(2)] + str(renumber[int(m.group(2))]) + key[m.end(2):]] = value
  return out


def _load_source(entry) -> tuple[dict[str, Any], str]:
  source = entry["source"]
  kind, sep, path = source.partition(":")
  if not sep or kind not in ("workdir", "pretrained") or not path:
    raise InitFromError(f"init_from source {source!r} must read workdir:PATH or pretrained:PATH")
  if not os.path.exists(path):
    raise InitFromError(f"init_from source {source!r}: {path} does not exist; point it at an "
                        "earlier run's --workdir or a local checkpoint directory")
  if kind == "workdir":
    checkpointer = Checkpointer(path)
    step = checkpointer.latest_step()
    if step is None:
      checkpointer.close()
      raise InitFromError(f"init_from source {source!r} holds no checkpoint under "
                          f"{checkpointer.directory}: train that run first")
    params = checkpointer.restore_raw(step)["params"]
    checkpointer.close()
    return flatten(params), f"{source} (step {step})"
  params, info = load_tower_params(path, entry.get("architecture", ""), entry.get("layers") or None)
  return flatten(params), f"{source} (layers {info['layers']})"


def apply_init_from(params: Any, entries: Sequence[Any]) -> tuple[Any, list[str]]:
  """params (host or device arrays) with the leaves named by `entries` replaced; returns the
  new tree (numpy leaves where replaced) and one log line per entry."""
  flat = flatten(params)
  log = []
  for entry in entries:
    source, where = _load_source(entry)
    if entry["source"].startswith("workdir:"):   # pretrained sources are selected while loading
      source = select_layers(source, entry.get("layers", ""), entry["source"])
    mapping = entry.get("mapping", ())
    if not mapping:
      raise InitFromError(f"init_from {entry['source']}: mapping is empty; give "
                          "((destination regex, source prefix), ...), e.g. (('student/', 'student/'),)")
    count = 0
    for dst_regex, src_prefix in mapping:
      pattern = re.compile(dst_regex)
      hits = 0
      for path, value in flat.items():
        m = pattern.match(path)
        if m is None:
          continue
        src = src_prefix + path[m.end():]
        if src not in source:
          near = [k for k in source if k.startswith(src_prefix)][:3]
          raise InitFromError(f"init_from {where}: no source param {src} for {path} (mapping "
                              f"{dst_regex!r} -> {src_prefix!r}; source has e.g. {near}): fix "
                              "the mapping or the layer selection")
        got = np.asarray(source[src])
        if got.shape != tuple(value.shape):
          raise InitFromError(f"init_from {where}: {src} has shape {got.shape} but {path} "
                              f"needs {tuple(value.shape)}: this run's model config must match "
                              "the source's (widths, heads, vocabulary)")
        flat[path] = got.astype(value.dtype)
        hits += 1
      if not hits:
        raise InitFromError(f"init_from {where}: mapping {dst_regex!r} matches no param of this "
                            f"run (its params start with {sorted({k.split('/')[0] for k in flat})})")
      count += hits
    log.append(f"init_from {where}: {count} params")
  leaves = [flat[path_str(p)] for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  return jax.tree.unflatten(jax.tree.structure(params), leaves), log
