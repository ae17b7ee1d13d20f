"""A JAX function of (params, inputs) -> a TFLite flatbuffer, the jax2tf converter route (docs/export.md):
`tf.function(jax2tf.convert(fn), input_signature=...)` on a `tf.Module` ->
`tf.lite.TFLiteConverter.from_concrete_functions`, TFLite builtin ops only. The params enter
as `tf.Variable`s, frozen into the flatbuffer by the converter: closing over them instead
embeds them as constants in the serialised StableHLO, and converting the paper-preset
ViT-B tower that way took more than 18 GB of memory.

The model gets one signature, "serving_default", with named inputs and one output
"embedding", and a static batch size (1 for a phone's query or photo; larger for indexing).
A dynamic batch dimension does not convert: the ViT's gathers become `vhlo.dynamic_gather`,
which TFLite has no kernel for.

Quantisation (post-training, paper 000 §4 / paper 001 §4.4 ship int8 towers):
  none       float32 weights and arithmetic;
  float16    float16 weights (half the size), dequantised to float32 when loaded;
  int8       dynamic range: int8 weights of matmuls/convolutions, activations quantised on the
             fly per op, the rest in float32 (`Optimize.DEFAULT` without a representative dataset);
  int8_full  full integer (what phone NPUs / DSPs run): int8 weights and activations with scales
             calibrated on a representative dataset, int32 biases, TFLITE_BUILTINS_INT8 only; the
             function is first rewritten for integer kernels (export/int8.py `legalize`). The
             model keeps the float32 interface: a QUANTIZE op after each float input and a
             DEQUANTIZE before the output; every op between runs on int8 (int32 for ids / mask).

TensorFlow is imported inside `convert` only (~5 s, ~1 GB); nothing else in the package needs it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxdistill.config import EXPORT_QUANTIZATIONS
from jaxdistill.export import ExportError, int8

SIGNATURE = "serving_default"
OUTPUT = "embedding"


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """One model input: name, shape without the batch dimension, numpy dtype name."""
  name: str
  shape: tuple[int, ...]
  dtype: str


def convert(fn: Callable, params: Any, inputs: Sequence[InputSpec], quantization: str, what: str,
            batch_size: int = 1, representative: Sequence[np.ndarray] | None = None,
            rewrites: dict | None = None) -> bytes:
  """fn(params, *arrays [batch_size, *spec.shape]) -> float32 [batch_size, E], with these
  params, as a TFLite flatbuffer.

  what: the model's name for error messages (e.g. "image encoder"). representative (int8_full
  only, required there): one array [N, *spec.shape] per input, N >= batch_size examples the
  scales are calibrated on; rewrites: a dict filled with int8.legalize's report. Raises
  ExportError when jax2tf or the converter cannot handle an op of `fn`, naming the ops."""
  if quantization not in EXPORT_QUANTIZATIONS:
    raise ExportError(f"quantization={quantization!r} is not valid: use one of "
                      f"{', '.join(EXPORT_QUANTIZATIONS)} (--config.export.quantization)")
  full_integer = quantization == "int8_full"
  if full_integer:
    if representative is None or len(representative) != len(inputs) or any(
        len(x) < batch_size for x in representative):
      raise ExportError(f"int8_full export of the {what} needs a representative dataset: one "
                        f"array per input ({', '.join(s.name for s in inputs)}) with at least "
                        f"{batch_size} rows")
    representative = [np.asarray(x, s.dtype) for x, s in zip(representative, inputs)]
    fn, report = int8.legalize(fn, params, representative, batch_size)
    if rewrites is not None:
      rewrites.update(report)
  import tensorflow as tf
  from jax.experimental import jax2tf

  signature = [tf.TensorSpec((batch_size, *s.shape), tf.as_dtype(s.dtype), name=s.name)
               for s in inputs]
  variables = jax.tree.map(lambda x: tf.Variable(np.asarray(x)), params)
  module = tf.Module()
  module.variables_list = jax.tree.leaves(variables)   # tracked by the module, frozen on convert
  converted = jax2tf.convert(fn, with_gradient=False)
  module.serve = tf.function(lambda *args: {OUTPUT: converted(variables, *args)},
                             autograph=False, input_signature=signature)
  try:
    concrete = module.serve.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif full_integer:
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
      converter.representative_dataset = lambda: (
          [x[i:i + batch_size] for x in representative]
          for i in range(0, len(representative[0]) - batch_size + 1, batch_size))
    model = converter.convert()
  except Exception as e:  # noqa: BLE001 - jax2tf and the converter raise many types; name the ops
    raise ExportError(f"cannot convert the {what} to TFLite: {_summary(str(e))}; the tower must "
                      "use ops with TFLite builtin kernels (no sort, linalg decompositions or host "
                      "callbacks)") from e
  left = float_ops(model) if full_integer else []
  if left:
    raise ExportError(f"int8_full: the converter left ops of the {what} in float ({', '.join(left)}"
                      "): they have no int8 kernel; rewrite them in export/int8.py or use "
                      "--config.export.quantization=int8 (dynamic range)")
  return model


def float_ops(model: bytes) -> list[str]:
  """Ops of a TFLite model with a float tensor, other than the QUANTIZE after a float input and
  the DEQUANTIZE before a float output (a full-integer model has none): ["NEG x2", ...]."""
  from ai_edge_litert.interpreter import Interpreter, OpResolverType
  interpreter = Interpreter(model_content=model, experimental_op_resolver_type=(
      OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
  dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
  found: dict[str, int] = {}
  for op in interpreter._get_ops_details():
    tensors = [i for i in (*op["inputs"], *op["outputs"]) if i >= 0]
    if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE") and any(
        np.issubdtype(dtypes[i], np.floating) for i in tensors):
      found[op["op_name"]] = found.get(op["op_name"], 0) + 1
  return [f"{name} x{count}" for name, count in sorted(found.items())]


def _summary(message: str) -> str:
  """The unconvertible ops named in a converter error (its text embeds whole modules)."""
  ops = re.findall(r"'([\w.]+)' op is (?:neither a custom op nor a flex op|not part of)", message)
  ops += [op.strip() for line in re.findall(r"Custom ops: ([^\n]+)", message)
          for op in line.split(",")]
  if ops:
    return "unsupported ops " + ", ".join(sorted(set(ops)))
  first = next((line.strip() for line in message.splitlines() if line.strip()), "unknown error")
  return first[:300]
