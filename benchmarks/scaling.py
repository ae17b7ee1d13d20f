"""Memory and throughput model of a ViT-B/16 student distilled from a CLIP ViT-L/14 teacher at
global batch 32,768 (docs/scaling.md): XLA's memory and cost analysis of the trainer's compiled
step on abstract shapes over the target's mesh. Compile only: nothing is allocated or run.

  # TPU v5e-256 (16 x 16 chips, 16 GiB HBM each): the real XLA:TPU compiler, from libtpu, for
  # the v5e 16x16 topology; no TPU needed (jax[tpu]==0.10.2 pins libtpu 0.0.42.*)
  .venv/bin/pip install --target /tmp/libtpu 'libtpu==0.0.42.*'
  PYTHONPATH=/tmp/libtpu .venv/bin/python benchmarks/scaling.py --target=v5e-256
  # 64 x H100: the same 64-way program, buffers assigned by XLA:TPU on a 64-chip v5p 4x4x4
  # topology (no CUDA compiler runs without a GPU); H100's 80 GB and peaks decide the fit
  PYTHONPATH=/tmp/libtpu .venv/bin/python benchmarks/scaling.py --target=h100x64
  # the same rows on XLA:CPU over simulated CPU devices (no libtpu; float32 rows only are
  # representative: XLA:CPU computes bfloat16 in float32)
  .venv/bin/python benchmarks/scaling.py --target=h100x64 --compiler=cpu

The step: configs/clip_distill.py (what launch/ starts; each row overrides its levers):
Leaner-and-Faster stage 2 (paper 000 §3.2.2: InfoNCE over the whole global batch + KD from the
frozen teacher's embeddings), both towers training, AdamW, built as the trainer builds it
(methods.build -> train/loop.py build_state -> train/step.py make_train_step). Student: CLIP
ViT-B/16's towers (jaxdistill/config.py clip_vit_b16_towers), embed_dim 768 = the teacher's.
Teacher: CLIP ViT-L/14 (openai/clip-vit-large-patch14's config, jaxdistill/pretrained/clip.py)
with abstract params (nothing is read): frozen, bfloat16, sharded over fsdp.

Per device: params, optimiser state, teacher and batch bytes are the shard sizes of the
compiled step's argument shardings; activations = XLA's temp allocation (activations kept for
the backward pass, the teacher's forward, gathered embeddings, scratch); peak = arguments +
temp (+ outputs that do not alias donated arguments). Throughput: the step's FLOPs per device
(XLA cost analysis) against the device's dense bfloat16 peak: the step time at 100% of peak (a
bound) and the examples/s at 40% model-FLOPs utilisation (an assumption, not a measurement).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:   # run as a script: benchmarks/ is a plain directory
  sys.path.insert(0, REPO)

_TARGET = flags.DEFINE_enum("target", "v5e-256", ["v5e-256", "h100x64"], "Slice to model.")
_COMPILER = flags.DEFINE_enum("compiler", "tpu", ["tpu", "cpu"],
                              "tpu: XLA:TPU (libtpu) for the target's topology; cpu: XLA:CPU on "
                              "simulated CPU devices.")
_BATCH = flags.DEFINE_integer("global_batch", 32_768, "Global batch (paper-scale CLIP).")
_ROWS = flags.DEFINE_string("row_ids", "", "Comma-separated row numbers (1-based) to compile; "
                            "empty = all.")


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  devices: int
  hbm_bytes: int          # usable memory per device
  peak_flops: float       # dense bfloat16 FLOP/s per device
  topology: str           # the XLA:TPU topology compiled for
  note: str


TARGETS = {
    # v5e: 16 GiB HBM2, 197 TFLOP/s bf16 per chip (Cloud TPU v5e documentation)
    "v5e-256": Target("TPU v5e-256", 256, 16 * 2**30, 197e12, "v5e:16x16",
                      "XLA:TPU for the v5e 16x16 topology"),
    # H100 SXM: 80 GB HBM3, 989 TFLOP/s dense bf16 (NVIDIA H100 datasheet)
    "h100x64": Target("64 x H100 (SXM, 80 GB)", 64, 80 * 10**9, 989e12, "v5p:4x4x4",
                      "the 64-way program's buffers from XLA:TPU on a 64-chip v5p topology"),
}

# (fsdp, remat, compute dtype, accum_steps): the levers, from none to all; fsdp = all devices
# shards params, gradients and optimiser state over the whole slice (ZeRO-3).
ROWS = (
    (1, "none", "float32", 1),
    ("all", "none", "float32", 1),
    ("all", "full", "float32", 1),
    ("all", "none", "bfloat16", 1),
    ("all", "full", "bfloat16", 1),
    ("all", "none", "bfloat16", 4),
    ("all", "full", "bfloat16", 4),
    (16, "full", "bfloat16", 1),
)

# openai/clip-vit-large-patch14 config.json (the fields clip_from_config reads)
CLIP_VIT_L14 = {
    "model_type": "clip", "projection_dim": 768,
    "vision_config": {"image_size": 224, "patch_size": 14, "hidden_size": 1024,
                      "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096},
    "text_config": {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 768,
                    "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072},
}


def devices_for(target: Target, compiler: str) -> list:
  """The target's devices: XLA:TPU topology devices (libtpu) or simulated CPU devices."""
  import jax
  if compiler == "cpu":
    if jax.device_count() < target.devices:
      raise SystemExit(f"--compiler=cpu needs {target.devices} CPU devices: run with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={target.devices}")
    return jax.devices()[:target.devices]
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
  except Exception as e:   # noqa: BLE001 -- libtpu missing or refusing: say how to get it
    raise SystemExit(f"cannot compile for {target.topology} ({type(e).__name__}: {e}); install "
                     "libtpu as this file's docstring says, or use --compiler=cpu") from None
  return list(topology.devices)[:target.devices]


def abstract_clip_teacher(dtype: str):
  """CLIP ViT-L/14 as a frozen Teacher with abstract (ShapeDtypeStruct) params in `dtype`."""
  import jax
  import jax.numpy as jnp
  from jaxdistill.pretrained import clip
  from jaxdistill.teachers.base import make_teacher
  module = clip.clip_from_config(CLIP_VIT_L14, dtype=jnp.dtype(dtype))
  images = jnp.zeros((1, 224, 224, 3), jnp.float32)
  ids = jnp.zeros((1, 77), jnp.int32)
  params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), images, ids)["params"])
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), params)
  return make_teacher("clip-vit-l14", params,
                      embed_images=lambda p, x: clip.embed_images(module, p, x),
                      embed_texts=lambda p, i, m: clip.embed_texts(module, p, i, m),
                      temperature=0.01)


def step_config(target: str, fsdp: int, remat: str, dtype: str, accum: int):
  """configs/clip_distill.py:<target> (the run the launch scripts start) with one row's levers."""
  from jaxdistill.config import load_config_file
  config = load_config_file(os.path.join(REPO, "configs", f"clip_distill.py:{target}"))
  config.teachers.teacher.path = "clip-vit-large-patch14 (abstract)"   # nothing is read
  config.mesh.fsdp = fsdp
  config.model.remat, config.model.dtype, config.train.accum_steps = remat, dtype, accum
  return config


def _shard_bytes(shapes, shardings) -> int:
  """Bytes of one device's shards of the arrays `shapes` (ShapeDtypeStructs) under `shardings`."""
  import jax
  import numpy as np
  sizes = jax.tree.map(
      lambda x, s: int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize, shapes, shardings)
  return int(sum(jax.tree.leaves(sizes)))


def compile_row(devices, target: str, batch: int, fsdp: int, remat: str, dtype: str,
                accum: int) -> dict:
  """Compiles one row's step for `devices` at global `batch`; bytes per device and FLOPs from
  XLA."""
  from unittest import mock

  from jaxdistill.methods import leaner_faster
  from jaxdistill.parallel.mesh import make_mesh

  from benchmarks.common import abstract_batch, trainer
  config = step_config(target, fsdp, remat, dtype, accum)
  config.batch_size = batch
  mesh = make_mesh(-1, fsdp, devices=devices)
  teacher = abstract_clip_teacher(config.teachers.teacher.dtype)
  spec = abstract_batch(config)
  with mock.patch.object(leaner_faster, "load_teacher", lambda section: teacher):
    recipe, built = trainer(config, mesh, spec)
  shardings = built["shardings"]
  lowered = built["step"].lower(built["abstract"], spec, recipe.frozen)
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:   # noqa: BLE001 -- XLA:TPU refuses a program larger than HBM
    used = re.search(r"Used ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm", str(e))
    if used is None:
      raise
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return {"out_of_memory": float(used[1]) * scale[used[2]],
            "compile_seconds": time.perf_counter() - start}
  seconds = time.perf_counter() - start
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state, state_sh = built["abstract"], shardings["state"]
  args = int(memory.argument_size_in_bytes)
  outputs_new = max(0, int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes))
  return {
      "params": _shard_bytes(state.params, state_sh.params),
      "optimizer": _shard_bytes(state.opt_state, state_sh.opt_state),
      "teacher": _shard_bytes(recipe.frozen, shardings["frozen"]),
      "batch": _shard_bytes(spec, shardings["batch"]),
      "arguments": args, "temp": int(memory.temp_size_in_bytes),
      "peak": args + int(memory.temp_size_in_bytes) + outputs_new,
      "flops": float(cost.get("flops", 0.0)),
      "compile_seconds": seconds,
  }


def main(argv):
  del argv
  import jax
  target = TARGETS[_TARGET.value]
  devices = devices_for(target, _COMPILER.value)
  batch, n = _BATCH.value, target.devices
  picked = {int(r) for r in _ROWS.value.split(",") if r} or set(range(1, len(ROWS) + 1))
  compiler = target.note if _COMPILER.value == "tpu" else f"XLA:CPU on {n} simulated devices"
  print(f"{target.name}: global batch {batch:,} ({batch // n} per device), {compiler}; "
        f"jax {jax.__version__}", flush=True)
  mib, gib = (lambda x: f"{x / 2**20:,.1f}"), (lambda x: f"{x / 2**30:,.2f}")
  header = ("| # | fsdp | remat | compute | accum | params MiB | optimiser MiB | teacher MiB | "
            "batch MiB | activations (temp) GiB | peak GiB | fits in "
            f"{target.hbm_bytes / 2**30:.1f} GiB | TFLOP / device / step | step at peak (s) | "
            "examples/s at 40% MFU |")
  rows = []
  for i, (fsdp, remat, dtype, accum) in enumerate(ROWS, 1):
    if i not in picked:
      continue
    fsdp = n if fsdp == "all" else fsdp
    r = compile_row(devices, _TARGET.value, batch, fsdp, remat, dtype, accum)
    if "out_of_memory" in r:   # XLA:TPU's own figure: "Used X of Y hbm"
      rows.append(f"| {i} | {fsdp} | {remat} | {dtype} | {accum} | | | | | | "
                  f"{gib(r['out_of_memory'])} (XLA: out of memory) | no | | | |")
      print(rows[-1], f"(compiled in {r['compile_seconds']:.0f} s)", flush=True)
      continue
    at_peak = r["flops"] / target.peak_flops
    if accum > 1:   # XLA's cost analysis counts a loop (the microbatch scans) body once
      rows.append(f"| {i} | {fsdp} | {remat} | {dtype} | {accum} | {mib(r['params'])} | "
                  f"{mib(r['optimizer'])} | {mib(r['teacher'])} | {mib(r['batch'])} | "
                  f"{gib(r['temp'])} | {gib(r['peak'])} | "
                  f"{'yes' if r['peak'] <= target.hbm_bytes else 'no'} | "
                  f"({r['flops'] / 1e12:,.1f}: loop bodies counted once) | | |")
      print(rows[-1], f"(compiled in {r['compile_seconds']:.0f} s)", flush=True)
      continue
    rows.append(
        f"| {i} | {fsdp} | {remat} | {dtype} | {accum} | {mib(r['params'])} | "
        f"{mib(r['optimizer'])} | {mib(r['teacher'])} | {mib(r['batch'])} | {gib(r['temp'])} | "
        f"{gib(r['peak'])} | {'yes' if r['peak'] <= target.hbm_bytes else 'no'} | "
        f"{r['flops'] / 1e12:,.1f} | {at_peak:.3f} | {batch / (at_peak / 0.4):,.0f} |")
    print(rows[-1], f"(compiled in {r['compile_seconds']:.0f} s)", flush=True)
  print("\nPer device.\n")
  print(header)
  print("|---" * (header.count("|") - 1) + "|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
