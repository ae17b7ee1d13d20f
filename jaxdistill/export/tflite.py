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
  none     float32 weights and arithmetic;
  float16  float16 weights (half the size), dequantised to float32 when loaded;
  int8     dynamic range: int8 weights of matmuls/convolutions, activations quantised on the
           fly per op, the rest in float32 (`Optimize.DEFAULT` without a representative dataset).

TensorFlow is imported inside `convert` only (~5 s, ~1 GB); nothing else in the package needs it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxdistill.config import EXPORT_QUANTIZATIONS
from jaxdistill.export import ExportError

SIGNATURE = "serving_default"
OUTPUT = "embedding"


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """One model input: name, shape without the batch dimension, numpy dtype name."""
  name: str
  shape: tuple[int, ...]
  dtype: str


def convert(fn: Callable, params: Any, inputs: Sequence[InputSpec], quantization: str, what: str,
            batch_size: int = 1) -> bytes:
  """fn(params, *arrays [batch_size, *spec.shape]) -> float32 [batch_size, E], with these
  params, as a TFLite flatbuffer.

  what: the model's name for error messages (e.g. "image encoder"). Raises ExportError when
  jax2tf or the converter cannot handle an op of `fn`, naming the ops."""
  if quantization not in EXPORT_QUANTIZATIONS:
    raise ExportError(f"quantization={quantization!r} is not valid: use one of "
                      f"{', '.join(EXPORT_QUANTIZATIONS)} (--config.export.quantization)")
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
    return converter.convert()
  except Exception as e:  # noqa: BLE001 - jax2tf and the converter raise many types; name the ops
    raise ExportError(f"cannot convert the {what} to TFLite: {_summary(str(e))}; the tower must "
                      "use ops with TFLite builtin kernels (no sort, linalg decompositions or host "
                      "callbacks)") from e


def _summary(message: str) -> str:
  """The unconvertible ops named in a converter error (its text embeds whole modules)."""
  ops = re.findall(r"'([\w.]+)' op is (?:neither a custom op nor a flex op|not part of)", message)
  ops += [op.strip() for line in re.findall(r"Custom ops: ([^\n]+)", message)
          for op in line.split(",")]
  if ops:
    return "unsupported ops " + ", ".join(sorted(set(ops)))
  first = next((line.strip() for line in message.splitlines() if line.strip()), "unknown error")
  return first[:300]
