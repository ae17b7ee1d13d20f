"""The one place that decides how every array is laid out on the mesh: sharding rules as data.

In the style of maxtext's logical-axis rules and big_vision's `sharding_strategy`, a config holds
an ordered list of (regex, spec) rules. Each leaf of a pytree (params, optax state, EMA params,
frozen teachers, batches) is named by its key path, e.g. "params/student/dual/image_projection/
kernel" or "opt_state/1/0/mu/student/...", and the first rule whose regex `re.fullmatch`es that
path gives its spec:

  "replicated"   a full copy on every device;
  "fsdp"         the largest dimension divisible by mesh.shape["fsdp"] is split over "fsdp"
                 (ties: the earliest such dim) when the leaf has >= min_fsdp_size elements and
                 fsdp > 1; otherwise replicated;
  "batch"        the leading dimension split over ("data", "fsdp") (parallel/mesh.BATCH_AXES);
  a tuple        a PartitionSpec written as data, one entry per leading dimension: None, an
                 axis name, or a tuple of axis names, e.g. (None, "fsdp").

Rules see whole paths, so a rule meant for a param should also match its AdamW moments and EMA
copy: r".*/student/dual/text_encoder/.*" covers "params/student/dual/text_encoder/...",
"ema_params/student/..." and "opt_state/2/inner_states/rule0/inner_state/0/mu/student/..."
(optax.chain index / multi_transform label / adamw's inner chain index / ScaleByAdamState field).
"fsdp" depends on the shape only, so moments always split like their params.

Scalars are always replicated. A leaf no rule matches, or a spec that does not fit the leaf or
the mesh, raises ShardingError naming the path, shape, spec and mesh, so nothing is sharded by
accident. Other modules take their NamedShardings from `tree_shardings` rather than building
PartitionSpecs themselves.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from jaxdistill.errors import JaxDistillError
from jaxdistill.parallel.mesh import BATCH_AXES

Spec = Union[str, tuple, list, PartitionSpec]
Rules = Sequence[tuple[str, Spec]]

REPLICATED, FSDP, BATCH = "replicated", "fsdp", "batch"
FSDP_AXIS = "fsdp"

# 2**14 elements (64 KiB in float32, a 128 x 128 matrix). Every matrix of 128 x 128 or more is
# split, so params + AdamW's mu and nu (3x the params) shrink by the fsdp factor; biases,
# LayerNorm scales and the temperature (at most a few thousand elements) stay whole: splitting
# them saves a few KiB per device but adds an all-gather per use whose cost is latency, not
# bandwidth. big_vision's fsdp strategy uses 4 MiB (min_size_to_shard_mb=4), tuned for
# ViT-B-and-up; the models here are 10-100x smaller, so the threshold is lower.
DEFAULT_MIN_FSDP_SIZE = 2**14

# Batches ("batch/...") split their leading dim over every device; the recipe state (CPRD's
# feature queues, parallel/queue.py) stays replicated as queue.py documents; everything else
# (params, opt_state, ema_params, frozen teachers) is fsdp-split when big enough.
DEFAULT_RULES: tuple[tuple[str, Spec], ...] = (
    (r"batch(/.*)?", BATCH),
    (r"extra(/.*)?", REPLICATED),
    (r".*", FSDP),
)

_FIX = "fix or add the rule for it in config.sharding"


class ShardingError(JaxDistillError):
  """No rule for a leaf, a malformed rule, or a spec that does not fit the leaf or the mesh."""


def path_str(keypath: Sequence[Any]) -> str:
  """A jax tree key path as "a/b/0/c": DictKey -> key, GetAttrKey -> name, SequenceKey and
  FlattenedIndexKey -> index (optax namedtuple states, flax struct dataclasses, dicts, tuples)."""
  parts = []
  for k in keypath:
    if isinstance(k, DictKey):
      parts.append(str(k.key))
    elif isinstance(k, GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _join(prefix: str, path: str) -> str:
  prefix = prefix.rstrip("/")
  return f"{prefix}/{path}" if prefix and path else (prefix or path)


def _spec_entries(spec: Spec) -> tuple | None:
  """Explicit spec -> tuple of entries (None | str | tuple[str, ...]); None if malformed."""
  if isinstance(spec, PartitionSpec):
    spec = tuple(spec)
  if not isinstance(spec, (tuple, list)):
    return None
  entries = []
  for e in spec:
    if e is None or isinstance(e, str):
      entries.append(e)
    elif isinstance(e, (tuple, list)) and all(isinstance(a, str) for a in e):
      entries.append(tuple(e))
    else:
      return None
  return tuple(entries)


def compile_rules(rules: Rules) -> list[tuple[re.Pattern, str | tuple]]:
  """Checks and compiles rules: [(regex, spec)] -> [(pattern, "replicated"|"fsdp"|"batch"|entries)].

  Raises ShardingError naming the rule (index and text) for a bad regex or spec."""
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise ShardingError(f"sharding rules must be a sequence of (regex, spec) pairs, got "
                        f"{rules!r}; {_FIX}")
  compiled = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ShardingError(f"sharding rule {i} {rule!r} is not a (regex, spec) pair; {_FIX}")
    regex, spec = rule
    try:
      pattern = re.compile(regex)
    except re.error as e:
      raise ShardingError(f"sharding rule {i} {rule!r}: bad regex ({e}); {_FIX}") from None
    if isinstance(spec, str):
      if spec not in (REPLICATED, FSDP, BATCH):
        raise ShardingError(f"sharding rule {i} {rule!r}: spec {spec!r} is not one of "
                            f"'replicated', 'fsdp', 'batch' or a tuple of axis names; {_FIX}")
      compiled.append((pattern, spec))
      continue
    entries = _spec_entries(spec)
    if entries is None:
      raise ShardingError(f"sharding rule {i} {rule!r}: spec must be 'replicated', 'fsdp', "
                          "'batch' or a tuple whose entries are None, an axis name or a tuple "
                          f"of axis names, e.g. (None, 'fsdp'); {_FIX}")
    compiled.append((pattern, entries))
  return compiled


def _fsdp_entries(shape: tuple[int, ...], fsdp: int, min_fsdp_size: int) -> tuple:
  if fsdp <= 1 or math.prod(shape) < min_fsdp_size:
    return ()
  dims = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  if not dims:
    return ()
  best = max(dims, key=lambda d: (shape[d], -d))      # largest; ties -> earliest
  return (None,) * best + (FSDP_AXIS,)


def _check_entries(path: str, shape: tuple[int, ...], entries: tuple, mesh: Mesh,
                   shown: Any) -> None:
  mesh_shape = dict(mesh.shape)

  def fail(why: str):
    raise ShardingError(f"sharding: {path!r} of shape {shape} cannot take spec {shown!r} on "
                        f"mesh {mesh_shape}: {why}; {_FIX}")

  if len(entries) > len(shape):
    fail(f"the spec has {len(entries)} entries but the leaf has {len(shape)} dims")
  used: list[str] = []
  for d, e in enumerate(entries):
    axes = () if e is None else (e,) if isinstance(e, str) else e
    for a in axes:
      if a not in mesh_shape:
        fail(f"the mesh has no axis {a!r} (axes: {tuple(mesh_shape)})")
      if a in used:
        fail(f"axis {a!r} is used twice")
      used.append(a)
    n = math.prod(mesh_shape[a] for a in axes)
    if shape[d] % n:
      fail(f"dim {d} of size {shape[d]} is not divisible by {'*'.join(axes)} = {n}")


def leaf_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules,
              min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> PartitionSpec:
  """The PartitionSpec the first rule matching `path` gives a leaf of `shape` on `mesh`."""
  return _leaf_spec(path, tuple(int(s) for s in shape), mesh, compile_rules(rules), min_fsdp_size)


def _leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, compiled, min_fsdp_size: int):
  for pattern, spec in compiled:
    if pattern.fullmatch(path):
      break
  else:
    raise ShardingError(f"sharding: no rule matches {path!r} (shape {shape}); add a rule for "
                        f"it to config.sharding, e.g. ({re.escape(path)!r}, 'replicated'), or "
                        "end the rules with a catch-all ('.*', 'fsdp')")
  if not shape or spec == REPLICATED:
    return PartitionSpec()
  if spec == FSDP:
    return PartitionSpec(*_fsdp_entries(shape, dict(mesh.shape).get(FSDP_AXIS, 1), min_fsdp_size))
  entries = (BATCH_AXES,) if spec == BATCH else spec
  _check_entries(path, shape, entries, mesh, spec)
  return PartitionSpec(*entries)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE, prefix: str = "") -> Any:
  """A NamedSharding per leaf of `tree` (arrays, jax.ShapeDtypeStruct or Python scalars).

  Leaves are named `prefix/path_str(keypath)` (prefix e.g. "params" or "frozen/clip"). For
  jax.jit in_/out_shardings, jax.device_put, or orbax restore targets."""
  compiled = compile_rules(rules)

  def one(keypath, leaf):
    path = _join(prefix, path_str(keypath))
    shape = tuple(int(d) for d in np.shape(leaf))
    return NamedSharding(mesh, _leaf_spec(path, shape, mesh, compiled, min_fsdp_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def _num_shards(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> int:
  indices = sharding.devices_indices_map(tuple(shape)).values()
  return len({tuple((s.start, s.stop, s.step) for s in idx) for idx in indices})


def shard_fraction(array: Any) -> float:
  """1 / the number of distinct shards of a placed array (or ShapeDtypeStruct with .sharding):
  1.0 replicated, 0.125 split 8 ways. The fraction of the array each device holds."""
  return 1.0 / _num_shards(array.sharding, tuple(array.shape))


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  raise AssertionError


def describe(tree: Any, shardings: Any = None, name: str = "state") -> str:
  """One line for logs: "state: 12.3 MB/device of 98.4 MB, 8 of 40 leaves split over fsdp".

  Shardings come from `shardings` (a matching tree) or each leaf's `.sharding` (live jax.Arrays,
  ShapeDtypeStructs from checkpoint.abstract_like); a leaf without one counts as replicated."""
  leaves = jax.tree.leaves(tree)
  shards = [getattr(x, "sharding", None) for x in leaves] if shardings is None else \
      jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  if len(shards) != len(leaves):
    raise ValueError(f"describe: {len(leaves)} leaves but {len(shards)} shardings")
  total = per_device = 0
  split, axes = 0, []
  for x, s in zip(leaves, shards):
    shape = tuple(np.shape(x))
    itemsize = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype).itemsize
    total += math.prod(shape) * itemsize
    local = shape if s is None else tuple(s.shard_shape(shape))
    per_device += math.prod(local) * itemsize
    if local != shape:
      split += 1
      for e in getattr(s, "spec", ()):
        for a in (() if e is None else (e,) if isinstance(e, str) else e):
          if a not in axes:
            axes.append(a)
  over = f" over {'+'.join(axes)}" if axes else ""
  return (f"{name}: {_fmt_bytes(per_device)}/device of {_fmt_bytes(total)}, {split} of "
          f"{len(leaves)} leaves split{over}")
