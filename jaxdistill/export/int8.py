"""Full-integer int8 export (`export.quantization=int8_full`): `legalize` rewrites a tower's
function so that the TFLite converter can give every tensor one int8 scale (calibrated min / max
over the representative dataset). What is rewritten, and why (docs/export.md, measured):

  - select_n with an infinite constant (flax's attention mask, finfo.min): int8 SELECT_V2
    shares one scale between inputs and output (logit scale ~1e36, uniform attention); the
    fill becomes the calibrated minimum of the live branch - MARGIN (e^-8 after softmax).
  - erf / erfc (exact GELU): expanded by the converter with a 1/x^2 term whose scales reach
    1e36 (LiteRT aborts in ADD's Prepare); becomes tanh's form, |error| <= 3.6e-4.
  - reduce_sum(x * x) (variances, L2 norms): the squares were requantised before the sum;
    becomes a dot product (int32 accumulation).
  - flax LayerNorm: x * (r gamma) + (beta - mu r gamma), no centred (x - mu) tensor.
  - models/bert.BertLayer: its position-wise half runs on token 0 ([CLS], BERT's massive
    activations: FFN output up to 201 vs < 13) and on tokens 1.. as separate tensors.
  - neg (no int8 kernel) -> x * -1; max(x, -inf) -> x; an integer 0/1 tensor cast to float (the
    pooling mask) -> select(x != 0, 1, 0).

The jaxpr is evaluated op by op (nested jits inlined; LayerNorm and BertLayer through flax
`intercept_methods`): the params stay inputs of the function, as for the other quantizations.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from jaxdistill.models.bert import BertAttention, BertLayer, activation

FILL_LIMIT = 1e30        # a select constant at least this large in magnitude is "infinite"
MARGIN = 8.0             # distance of a rewritten fill from the calibrated range (e^-8 = 3.4e-4)
ERF_CLIP = 3.0           # erf(3) = 1 - 2.2e-5
_ERF_A, _ERF_B = 2.0 / math.sqrt(math.pi), 2 * 0.044715
_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
           "checkpoint": "jaxpr", "remat": "jaxpr"}
_SHAPE_OPS = {"broadcast_in_dim", "reshape", "convert_element_type", "squeeze", "expand_dims",
              "transpose", "copy"}


def legalize(fn: Callable, params: Any, examples: Sequence[np.ndarray], batch_size: int = 1
             ) -> tuple[Callable, dict]:
  """fn(params, *inputs [batch_size, ...]) -> (the rewritten function, same signature and
  shapes; report {"masked_selects": [{"min", "max"}] of each rewritten select's live branch,
  "erf", "sum_of_squares", "mask_casts": counts}).

  examples: the representative inputs, one array [N, *input shape] per input of fn; the fills and
  casts are calibrated on its batches of batch_size rows, as the converter calibrates scales."""
  batches = [[np.asarray(x[i:i + batch_size]) for x in examples]
             for i in range(0, len(examples[0]) - batch_size + 1, batch_size)]

  def traced(p, *inputs):
    with nn.intercept_methods(_layer_norm), nn.intercept_methods(_bert_layer):
      return fn(p, *inputs)
  closed = jax.make_jaxpr(traced)(params, *batches[0])
  n_args = len(jax.tree.leaves(params)) + len(examples)
  counts: dict = {}

  def run(plan, p, *inputs):
    records = {"select": [], "cast": []}
    state = {"select": 0, "cast": 0, "erf": 0, "sum_of_squares": 0, "mask_casts": 0}
    outs = _eval(closed.jaxpr, closed.consts, [*jax.tree.leaves(p), *inputs], [None] * n_args,
                 plan, records, state)
    counts.update(state)
    return outs, records

  calibrate = jax.jit(lambda p, *inputs: run(None, p, *inputs)[1])
  seen = [jax.tree.map(np.asarray, calibrate(params, *batch)) for batch in batches]
  ranges = {kind: (np.min([[r[0] for r in s[kind]] for s in seen], 0),
                   np.max([[r[1] for r in s[kind]] for s in seen], 0)) if seen[0][kind] else
            ((), ()) for kind in ("select", "cast")}
  lo, hi = ranges["select"]
  plan = {"select": [(float(a) - MARGIN, float(b) + MARGIN) for a, b in zip(lo, hi)],
          "cast": [bool(a >= 0 and b <= 1) for a, b in zip(*ranges["cast"])]}
  single = len(closed.jaxpr.outvars) == 1

  def legal(p, *inputs):
    outs = run(plan, p, *inputs)[0]
    return outs[0] if single else tuple(outs)

  jax.eval_shape(legal, params, *batches[0])   # counts the rewrites
  return legal, {"masked_selects": [{"min": float(a), "max": float(b)} for a, b in zip(lo, hi)],
                 **{k: counts[k] for k in ("erf", "sum_of_squares", "mask_casts")}}


def _norm(x: jax.Array, scale, bias, epsilon: float) -> jax.Array:
  """LayerNorm over the last axis as x * (r scale) + (bias - mu r scale), r = rsqrt(var + eps):
  no centred (x - mu) tensor; the sum of squares as a dot product (int32 accumulation)."""
  n, last = x.shape[-1], x.ndim - 1
  batch = tuple(range(last))
  mean = jnp.sum(x, -1, keepdims=True) / n
  square = jax.lax.dot_general(x, x, (((last,), (last,)), (batch, batch)))[..., None] / n
  r = jax.lax.rsqrt(jnp.maximum(square - mean * mean, 0.0) + epsilon)
  return x * (r * scale) + (bias - mean * r * scale)


def _layer_norm(next_fun, args, kwargs, context):
  """Interceptor: flax LayerNorm over the last axis -> `_norm`."""
  m = context.module
  if (not isinstance(m, nn.LayerNorm) or context.method_name != "__call__" or kwargs
      or m.reduction_axes != -1 or m.feature_axes != -1):
    return next_fun(*args, **kwargs)
  scale = m.get_variable("params", "scale") if m.use_scale else 1.0
  bias = m.get_variable("params", "bias") if m.use_bias else 0.0
  return _norm(args[0], scale, bias, m.epsilon).astype(m.dtype or args[0].dtype)


def _bert_layer(next_fun, args, kwargs, context):
  """Interceptor: a self-attention models/bert.BertLayer, x [B, L, D], mask [B, L] -> [B, L, D]
  (the same function), with its position-wise half (attention_ln, FFN, output_ln) computed on
  token 0 and on tokens 1.. as two tensors, joined after output_ln."""
  m = context.module
  if (not isinstance(m, BertLayer) or context.method_name != "__call__" or kwargs
      or m.cross_attention or any(a is not None for a in args[2:]) or args[0].shape[1] < 2):
    return next_fun(*args, **kwargs)
  x, mask = args[:2]
  p = m.variables["params"]
  attended = BertAttention(m.num_heads, m.dtype).apply({"params": p["attention"]}, x, x, mask)
  dense = lambda name, h: h @ p[name]["kernel"] + p[name]["bias"]
  norm = lambda name, h: _norm(h, p[name]["scale"], p[name]["bias"], m.layer_norm_eps)

  def position_wise(h, a):
    h = norm("attention_ln", h + a)
    inner = activation(m.hidden_act)(dense("intermediate", h))
    return norm("output_ln", h + dense("output", inner))
  return jnp.concatenate([position_wise(x[:, :1], attended[:, :1]),
                          position_wise(x[:, 1:], attended[:, 1:])], axis=1)


def _erf(z: jax.Array) -> jax.Array:
  c = jnp.clip(z, -ERF_CLIP, ERF_CLIP)
  return jnp.tanh(_ERF_A * (c + _ERF_B * c * c * c))


def _infinite(value: np.ndarray) -> int:
  """-1 / +1 when `value` (a trace-time constant) is all <= -FILL_LIMIT / >= FILL_LIMIT, else 0."""
  if not np.issubdtype(value.dtype, np.floating) or value.size == 0:
    return 0
  if np.all(value <= -FILL_LIMIT):
    return -1
  return 1 if np.all(value >= FILL_LIMIT) else 0


def _eval(jaxpr, consts, args, known, plan, records, state):
  """Evaluates `jaxpr` on `args` with the rewrites. known[i]: the numpy value of args[i] when it
  is a trace-time constant, else None. plan None = calibration: appends (min, max) of each
  masked select's live branch and of each integer -> float cast to records; else plan holds the
  fills ("select": [(low, high)]) and which casts are 0/1 masks ("cast": [bool]), in visiting
  order."""
  env, const, squares = {}, {}, {}

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  def const_value(v):
    if isinstance(v, Literal):
      return np.asarray(v.val)
    return const.get(v)

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = const[v] = np.asarray(x)
  for v, x, k in zip(jaxpr.invars, args, known):
    env[v] = x
    if k is not None:
      const[v] = k
  for eqn in jaxpr.eqns:
    name, vals = eqn.primitive.name, [read(v) for v in eqn.invars]
    values = [const_value(v) for v in eqn.invars]
    if name in _INLINE and _INLINE[name] in eqn.params:
      sub = eqn.params[_INLINE[name]]
      inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
      outs = _eval(inner, inner_consts, vals, values, plan, records, state)
    elif name == "reduce_sum" and eqn.invars[0] in squares:
      x = squares[eqn.invars[0]]
      axes = tuple(eqn.params["axes"])
      batch = tuple(i for i in range(x.ndim) if i not in axes)
      state["sum_of_squares"] += 1
      outs = [jax.lax.dot_general(x, x, ((axes, axes), (batch, batch)))]
    elif name in ("max", "min") and _neutral(name, values, eqn):   # max(x, -inf) = x
      outs = [next(x for x, c in zip(vals, values) if c is None)]
    elif name == "neg" and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
      outs = [vals[0] * jnp.asarray(-1.0, vals[0].dtype)]   # TFLite's NEG has no int8 kernel
    elif name in ("erf", "erfc"):
      state["erf"] += 1
      e = _erf(vals[0])
      outs = [e if name == "erf" else 1.0 - e]
    elif name == "select_n" and _fill_sides(values[1:]):
      outs = [_masked_select(eqn, vals, _fill_sides(values[1:]), plan, records, state)]
    elif (name == "convert_element_type" and values[0] is None
          and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating)
          and not jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating)):
      outs = [_cast(eqn, vals[0], plan, records, state)]
    elif name in _SHAPE_OPS and all(v is not None for v in values):   # folded at trace time
      with jax.ensure_compile_time_eval():
        folded = eqn.primitive.bind(*values, **eqn.params)
      outs = [np.asarray(x) for x in (folded if eqn.primitive.multiple_results else [folded])]
      for v, x in zip(eqn.outvars, outs):
        const[v] = x
    else:
      outs = eqn.primitive.bind(*vals, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    if (name == "square" or (name == "integer_pow" and eqn.params.get("y") == 2)
        or (name == "mul" and eqn.invars[0] is eqn.invars[1])):
      squares[eqn.outvars[0]] = vals[0]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _neutral(name: str, values: list, eqn) -> bool:
  """max / min of a traced operand (of the output's shape) and an infinite constant that never
  wins (-inf for max, +inf for min): jax.nn.softmax's `initial=-inf`."""
  if sum(v is None for v in values) != 1:
    return False
  live = next(v for v, c in zip(eqn.invars, values) if c is None)
  const = next(c for c in values if c is not None)
  return (live.aval.shape == eqn.outvars[0].aval.shape
          and _infinite(const) == (-1 if name == "max" else 1))


def _fill_sides(cases: list) -> list[int] | None:
  """Per case of a select_n: -1 / +1 for an infinite constant, 0 otherwise; None unless exactly
  one case is live (not a constant) and another is infinite."""
  sides = [0 if c is None else _infinite(c) for c in cases]
  live = [c is None for c in cases]
  return sides if any(sides) and sum(live) == 1 else None


def _masked_select(eqn, vals, sides, plan, records, state):
  index = state["select"]
  state["select"] += 1
  live = next(v for v, s in zip(vals[1:], sides) if s == 0)
  if plan is None:
    records["select"].append(jnp.stack([jnp.min(live), jnp.max(live)]).astype(jnp.float32))
    return eqn.primitive.bind(*vals, **eqn.params)
  low, high = plan["select"][index]
  cases = [c if s == 0 else jnp.full_like(live, low if s < 0 else high)
           for c, s in zip(vals[1:], sides)]
  return eqn.primitive.bind(vals[0], *cases, **eqn.params)


def _cast(eqn, x, plan, records, state):
  index = state["cast"]
  state["cast"] += 1
  dtype = eqn.params["new_dtype"]
  if plan is None:
    records["cast"].append(jnp.stack([jnp.min(x), jnp.max(x)]).astype(jnp.float32))
  elif plan["cast"][index]:
    state["mask_casts"] += 1
    return jnp.where(x != 0, jnp.ones(x.shape, dtype), jnp.zeros(x.shape, dtype))
  return eqn.primitive.bind(x, **eqn.params)
