"""XLA's memory of the compiled dual-encoder train step under the memory levers
(config.model.remat x config.model.dtype), compile only: nothing is allocated or run.

  .venv/bin/python benchmarks/memory_levers.py [--small_batch=32] [--vit_b_batch=8]

Rows: the cpu preset's student (configs/dual.py:cpu) and a ViT-B/16-sized one (224 px RGB,
16 px patches, 12 x 768 vision layers; CLIP ViT-B/16's 12 x 512 text tower, 77 tokens, 49,408
ids), each with remat none / full / dots and float32 / bfloat16 compute. The step is the
trainer's (train/loop.py build_state + train/step.py make_train_step, the dual recipe's loss,
AdamW) lowered on abstract shapes (jax.eval_shape, ShapeDtypeStruct) on one device and
compiled; the figures are the compiled step's memory_analysis(): temporaries (activations kept
for the backward pass and scratch), arguments (state + batch) and outputs (the new state, which
aliases the donated arguments). They are deterministic for a given jax / XLA version and
machine type, whatever the machine's load. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:   # run as a script: benchmarks/ is a plain directory
  sys.path.insert(0, REPO)
from benchmarks.common import abstract_batch, trainer  # noqa: E402

_SMALL_BATCH = flags.DEFINE_integer("small_batch", 32, "Global batch of the cpu-preset rows.")
_VIT_B_BATCH = flags.DEFINE_integer("vit_b_batch", 8, "Global batch of the ViT-B/16 rows.")
LEVERS = (("none", "float32"), ("full", "float32"), ("dots", "float32"),
          ("none", "bfloat16"), ("full", "bfloat16"))


def step_memory(config) -> dict[str, int]:
  """Bytes of the compiled train step of `config` (a dual-recipe config) on one device:
  {"temp", "argument", "output"} from XLA's memory_analysis(), on abstract shapes."""
  import jax
  from jaxdistill.parallel.mesh import make_mesh

  spec = abstract_batch(config)
  recipe, built = trainer(config, make_mesh(devices=jax.devices()[:1]), spec)
  frozen = jax.eval_shape(lambda: recipe.frozen)
  memory = built["step"].lower(built["abstract"], spec, frozen).compile().memory_analysis()
  return {"temp": int(memory.temp_size_in_bytes),
          "argument": int(memory.argument_size_in_bytes),
          "output": int(memory.output_size_in_bytes)}


def _config(preset: str, batch: int, remat: str, dtype: str):
  from jaxdistill.config import clip_vit_b16_towers, load_config_file
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config_file(os.path.join(repo, "configs", "dual.py:cpu"))
  if preset == "vit_b16":
    clip_vit_b16_towers(config.model)
  config.batch_size, config.model.remat, config.model.dtype = batch, remat, dtype
  return config


def main(argv):
  del argv
  import jax
  rows = []
  for preset, batch in (("cpu", _SMALL_BATCH.value), ("vit_b16", _VIT_B_BATCH.value)):
    base = None
    for remat, dtype in LEVERS:
      mem = step_memory(_config(preset, batch, remat, dtype))
      base = base or mem["temp"]
      rows.append(f"| {preset} | {batch} | {remat} | {dtype} | {mem['temp'] / 2**20:,.1f} | "
                  f"{mem['temp'] / base:.2f} | {mem['argument'] / 2**20:,.1f} | "
                  f"{mem['output'] / 2**20:,.1f} |")
      print(rows[-1], flush=True)
  print(f"\njax {jax.__version__}, backend {jax.default_backend()}, {platform.machine()}\n")
  print("| student | batch | remat | compute dtype | temp MiB | temp / none-float32 | "
        "arguments MiB | outputs MiB |")
  print("|---|---:|---|---|---:|---:|---:|---:|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
