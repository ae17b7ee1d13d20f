"""Throughput and memory of the jitted LoopITR train step, side by side in one run.

  .venv/bin/python benchmarks/train_step.py [--steps=10] [--paper_batch=8]

Rows: the random-init cpu preset (configs/loopitr.py:scratch) at its batch (m=4); the same at
batch 32 with m=4 and with all 31 in-batch negatives (paper 003 footnote 1: m=4 trains 1.4x
faster than m=31), side by side; and the paper preset at a small batch. Memory is XLA's
buffer assignment for the compiled step (arguments + outputs + temporaries) and the
process's peak RSS. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:   # run as a script: benchmarks/ is a plain directory
  sys.path.insert(0, REPO)
from benchmarks.common import synthetic_batch, trainer  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per row (after 2 warm-up steps).")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch", 8, "Global batch of the paper-preset row.")


def _row(name, config, steps):
  """Builds the recipe and its jitted step as the trainer does (benchmarks/common.py `trainer`)
  and times it on one synthetic batch."""
  import jax
  from jaxdistill.data import pipeline
  from jaxdistill.parallel.mesh import make_mesh

  b = config.batch_size
  host_batch = synthetic_batch(config)
  recipe, built = trainer(config, make_mesh(config.mesh.data, config.mesh.fsdp),
                          pipeline.global_batch_spec(host_batch))
  shardings = built["shardings"]
  state = built["init"]()
  batch = pipeline.to_global_batch(host_batch, shardings["batch"])
  frozen = jax.device_put(recipe.frozen, shardings["frozen"])
  jitted = built["step"]
  memory = jitted.lower(state, batch, frozen).compile().memory_analysis()
  step_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  step = lambda s, b: jitted(s, b, frozen)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / steps
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(name=name, batch=b, params=params, step_s=seconds, ex_s=b / seconds,
              compile_s=compile_s, step_mb=step_bytes / 2**20)


def main(argv):
  del argv
  from jaxdistill.config import load_config_file
  loopitr = lambda preset: load_config_file(os.path.join(REPO, "configs", f"loopitr.py:{preset}"))
  rows = []
  cpu = loopitr("scratch")   # the cpu preset before pretrained towers (docs/benchmarks.md rows)
  rows.append(_row("scratch (random-init cpu) preset, m=4", cpu, _STEPS.value))
  for m in (4, 31):   # paper 003 Table 1 setting: batch 32, m=4 vs all 31 in-batch negatives
    small = loopitr("scratch")
    small.batch_size, small.loopitr.num_negatives = 32, m
    rows.append(_row(f"scratch (random-init cpu) preset, m={m}", small, _STEPS.value))
  paper = loopitr("paper")
  paper.batch_size = _PAPER_BATCH.value
  rows.append(_row(f"paper preset, batch {paper.batch_size}", paper, max(2, _STEPS.value // 5)))
  peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  import jax
  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.device_count()} x {jax.devices()[0].platform}; jax {jax.__version__}")
  print("| config | global batch | params | s/step | examples/s | step memory (XLA) | compile s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['step_s']:.3f} | "
          f"{r['ex_s']:.1f} | {r['step_mb']:.0f} MiB | {r['compile_s']:.1f} |")
  print(f"\nratio m=4 vs m=31 at batch 32 (examples/s): {rows[1]['ex_s'] / rows[2]['ex_s']:.2f}x "
        "(paper 003 reports 1.4x for m=4 vs m=31)")
  print(f"peak process RSS over the run: {peak_rss_gb:.2f} GiB")


if __name__ == "__main__":
  app.run(main)
