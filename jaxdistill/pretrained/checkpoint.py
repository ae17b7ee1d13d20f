"""Reading PyTorch / Hugging Face checkpoints and mapping them onto Flax param trees.

`read_state_dict` reads a Hugging Face directory (model.safetensors, its sharded index, or
pytorch_model.bin) or one file (.safetensors, .bin, .pth, .pt) into {torch key: np.ndarray}.
Safetensors are parsed directly (header + raw buffer; bf16 through ml_dtypes); .bin/.pth/.pt go
only through `torch.load(weights_only=True)`, so nothing else is ever unpickled.

`map_state_dict` renames torch keys with a family's regex rules (big_vision style) and fills the
model's expected param tree, checking every leaf: each family module only declares its rules.
The torch leaf name decides the layout change: `weight` becomes the Flax module's `kernel`
(Linear [out, in] -> [in, out]; Conv OIHW -> HWIO), `scale` (LayerNorm) or `embedding` (Embed),
whichever the expected tree holds; any other name (nn.Parameter, `bias`) is copied as is.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from jaxdistill.errors import JaxDistillError

StateDict = dict[str, np.ndarray]
Rules = Sequence[tuple[str, str]]

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_WRAPPER_KEYS = ("state_dict", "model")
_SHOWN = 5  # how many key names an error lists


class CheckpointError(JaxDistillError, ValueError):
  """A checkpoint that cannot be read or does not fit the model (names the key and the fix)."""


def _read_safetensors(path: str) -> StateDict:
  """One .safetensors file -> {key: array} (memory-mapped; bf16 as ml_dtypes.bfloat16)."""
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor '{key}' has dtype {info['dtype']}, which jaxdistill "
                            f"cannot read: convert it to one of {sorted(_SAFETENSORS_DTYPES)}")
    begin, end = info["data_offsets"]
    out[key] = np.frombuffer(buffer[begin:end], dtype=_SAFETENSORS_DTYPES[info["dtype"]]
                             ).reshape(info["shape"])
  return out


def _read_torch(path: str) -> StateDict:
  """One .bin/.pth/.pt file via torch.load(weights_only=True); unwraps {"state_dict"|"model"}."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f"{path} is a PyTorch pickle: reading it needs torch (pip install "
                          "torch), or convert it to .safetensors") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError/RuntimeError for unsafe or broken files
    raise CheckpointError(f"{path}: torch.load(weights_only=True) failed ({e}); only plain "
                          "tensor state dicts are read: re-save it with torch.save(state_dict) "
                          "or as .safetensors") from e
  for wrapper in _WRAPPER_KEYS:
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict: save "
                          "model.state_dict() instead")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor: "
                            "save only the model's state_dict()")
    value = value.detach()
    out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return out


def _read_file(path: str) -> StateDict:
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith((".bin", ".pth", ".pt")):
    return _read_torch(path)
  raise CheckpointError(f"unknown checkpoint file type: {path}; expected .safetensors, .bin, "
                        ".pth or .pt, or a Hugging Face model directory")


def read_state_dict(path: str) -> StateDict:
  """Directory (HF layout) or one file -> {torch key: np.ndarray}.

  A directory is read from model.safetensors, then model.safetensors.index.json (shards), then
  pytorch_model.bin.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path does not exist: {path}; pass a Hugging Face model "
                          "directory or a .safetensors/.bin/.pth file")
  if not os.path.isdir(path):
    return _read_file(path)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  pickle = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(single):
    return _read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(_read_safetensors(os.path.join(path, shard)))
    return out
  if os.path.isfile(pickle):
    return _read_torch(pickle)
  raise CheckpointError(f"{path} has no model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin: save the model there with save_pretrained()")


def read_config(path: str) -> dict[str, Any]:
  """config.json of an HF directory (or of the directory holding a checkpoint file) -> dict."""
  path = os.fspath(path)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config = os.path.join(directory, "config.json")
  if not os.path.isfile(config):
    raise CheckpointError(f"no config.json next to {path}: save the model with "
                          "save_pretrained(), or pass the architecture and config explicitly")
  with open(config) as f:
    return json.load(f)


def layer_indices(selection: str | None, num_layers: int) -> list[int]:
  """Layer selection of a num_layers-layer checkpoint -> the kept layer indices, in order.

  selection: None (all) | "first:N" | "last:N" | "i,j,k" (distinct indices). Papers 000, 004
  initialise students from the first N layers of a teacher.
  """
  if selection is None:
    return list(range(num_layers))
  fix = (f"use first:N or last:N with 1 <= N <= {num_layers}, or distinct indices in "
         f"0..{num_layers - 1} such as '0,2,4'")
  head, colon, count = selection.strip().partition(":")
  if colon:
    count = count.strip()
    if head not in ("first", "last") or not count.isdigit():
      raise CheckpointError(f"layer selection {selection!r} is malformed: {fix}")
    n = int(count)
    if not 1 <= n <= num_layers:
      raise CheckpointError(f"layer selection {selection!r} is out of range: the checkpoint has "
                            f"{num_layers} layers; {fix}")
    return list(range(n)) if head == "first" else list(range(num_layers - n, num_layers))
  parts = [p.strip() for p in selection.split(",")]
  if not all(p.isdigit() for p in parts):
    raise CheckpointError(f"layer selection {selection!r} is malformed: {fix}")
  indices = [int(p) for p in parts]
  if max(indices) >= num_layers or len(set(indices)) < len(indices):
    raise CheckpointError(f"layer selection {selection!r} is out of range or repeats a layer: "
                          f"the checkpoint has {num_layers} layers; {fix}")
  return indices


def select_layers(state_dict: StateDict, layer_pattern: str, selection: str
                  ) -> tuple[StateDict, list[int]]:
  """Keeps the layers `selection` picks (layer_indices), renumbered 0..n-1, and every key
  outside the layers -> (state dict, kept original indices). layer_pattern is a regex whose
  first group is the layer index, e.g. r"encoder\\.layer\\.(\\d+)\\."."""
  pattern = re.compile(layer_pattern)
  present = {int(m.group(1)) for k in state_dict if (m := pattern.search(k))}
  if not present:
    raise CheckpointError(f"no key matches the layer pattern {layer_pattern!r}: check the "
                          "checkpoint's layout")
  kept = layer_indices(selection, len(present))
  new_index = {old: new for new, old in enumerate(kept)}
  out = {}
  for key, value in state_dict.items():
    if not (m := pattern.search(key)):
      out[key] = value
    elif int(m.group(1)) in new_index:
      out[f"{key[:m.start(1)]}{new_index[int(m.group(1))]}{key[m.end(1):]}"] = value
  return out, kept


def _to_flax(leaf: str, value: np.ndarray, module: set[str]) -> tuple[str, np.ndarray]:
  """Torch leaf name + value -> Flax leaf name + value in Flax layout (see module docstring);
  module: the param names the Flax module expects."""
  if leaf != "weight":
    return leaf, value
  if "kernel" in module:
    if value.ndim == 2:
      return "kernel", value.T
    if value.ndim == 4:
      return "kernel", value.transpose(2, 3, 1, 0)
    return "kernel", value
  if "scale" in module:
    return "scale", value
  if "embedding" in module:
    return "embedding", value
  return leaf, value


def _torch_shape(flax_leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Expected Flax shape -> the shape the torch checkpoint should hold."""
  if flax_leaf == "kernel" and len(shape) == 2:
    return shape[::-1]
  if flax_leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _names(keys: Sequence[str]) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
  return ", ".join(repr(k) for k in keys[:_SHOWN]) + more


def map_state_dict(state_dict: Mapping[str, np.ndarray], rules: Rules, expected: Any,
                   ignore: Sequence[str] = ()) -> dict[str, Any]:
  """Torch state dict -> Flax params shaped like `expected` (a param tree of arrays or
  jax.ShapeDtypeStruct, e.g. jax.eval_shape(module.init, ...)["params"]).

  rules: (regex, replacement) pairs applied in order with re.sub to each torch key; the result
  is a '/'-separated Flax path whose last part is the torch leaf name. ignore: regexes
  (re.search) of torch keys to drop (buffers, momentum copies, heads the model does not use).
  Raises one CheckpointError naming the key for a shape mismatch, or listing the missing
  (expected, not in the checkpoint) and unexpected (in the checkpoint, not expected) keys.
  """
  expected_flat = {"/".join(p): v for p, v in _flatten(expected).items()}
  leaves: dict[str, set[str]] = {}  # Flax module path -> its param names
  for flax_path in expected_flat:
    module_path, _, leaf = flax_path.rpartition("/")
    leaves.setdefault(module_path, set()).add(leaf)
  ignored = [re.compile(p) for p in ignore]
  filled: dict[str, np.ndarray] = {}
  source: dict[str, str] = {}
  unexpected = []
  for key, value in state_dict.items():
    if any(p.search(key) for p in ignored):
      continue
    path = key
    for pattern, replacement in rules:
      path = re.sub(pattern, replacement, path)
    module_path, _, leaf = path.rpartition("/")
    flax_leaf, value = _to_flax(leaf, np.asarray(value), leaves.get(module_path, set()))
    flax_path = f"{module_path}/{flax_leaf}" if module_path else flax_leaf
    if flax_path not in expected_flat:
      unexpected.append(f"{key} (-> {flax_path})")
      continue
    want = expected_flat[flax_path]
    if value.shape != tuple(want.shape):
      raise CheckpointError(
          f"shape mismatch for checkpoint key '{key}' (Flax param '{flax_path}'): the model "
          f"expects {_torch_shape(flax_leaf, tuple(want.shape))}, the checkpoint has "
          f"{_torch_shape(flax_leaf, value.shape)} (torch layout); check the config "
          "(widths, vocab, image size) matches the checkpoint")
    if flax_path in filled:
      raise CheckpointError(f"checkpoint keys '{source[flax_path]}' and '{key}' both map to "
                            f"Flax param '{flax_path}': the mapping rules are ambiguous")
    filled[flax_path] = np.asarray(value, dtype=want.dtype)
    source[flax_path] = key
  missing = [k for k in expected_flat if k not in filled]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing (Flax params with no checkpoint key): " + _names(
          [f"{k} {_torch_shape(k.rpartition('/')[2], tuple(expected_flat[k].shape))}"
           for k in missing]))
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected checkpoint keys: {_names(unexpected)}")
    raise CheckpointError("checkpoint does not fit the model: " + "; ".join(parts) +
                          ". Check the architecture and config (num layers, heads) match the "
                          "checkpoint")
  return _unflatten(filled)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out
