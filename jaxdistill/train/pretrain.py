"""Self-supervised pretraining of an image-only network (`--mode=pretrain_image`; the DINO recipe,
methods/dino.py), on the trainer's pieces: `loop.build_state` (optimiser from config.trainable,
shardings, resume > config.init_from > random init, and the jitted step with the recipe's EMA
modules), the orbax Checkpointer (resume, SIGTERM), MetricsWriter and Progress.
What differs from `loop.train_and_evaluate`: no benchmark and no data pipeline (the recipe draws
its images on device from the step key, so the batch is empty) and, at the end, a linear probe of
the student's features (evaluate/probe.py) instead of retrieval: `<workdir>/probe.json`.

Knows no method: `pretrain_and_probe` gets `build_recipe(config, mesh) -> Recipe` from methods/.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import ml_collections

from jaxdistill.atomic import write_json_atomic
from jaxdistill.data.fashion_mnist import load_fashion_mnist
from jaxdistill.evaluate.probe import format_probe, linear_probe
from jaxdistill.models.build import towers
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.progress import Progress
from jaxdistill.store.checkpoint import Checkpointer
from jaxdistill.store.provenance import provenance
from jaxdistill.store.run import STUDENT
from jaxdistill.train.loop import Preemption, build_state, remaining_saves, restore_or_init
from jaxdistill.train.metrics import MetricsWriter

PROBE_FILE = "probe.json"
TIMING = ("train_seconds_this_run", "seconds_per_step")   # kept when a finished run is re-probed
LOGGED = ("loss", "teacher_entropy", "kl")   # shown on the progress line


def pretrain_and_probe(config: ml_collections.ConfigDict, workdir: str,
                       build_recipe: Callable) -> dict | None:
  """Trains `build_recipe(config, mesh)` in `workdir` (resuming from its latest checkpoint),
  then probes its student (and its EMA teacher, and the random init) with a linear classifier.
  Returns the probe report (also written to <workdir>/probe.json), or None when stopped by
  SIGTERM (after saving)."""
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  recipe = build_recipe(config, mesh)
  built = build_state(recipe, config, mesh, {})
  shardings = built["shardings"]
  frozen = jax.device_put(recipe.frozen, shardings["frozen"])
  checkpointer = Checkpointer(workdir, config.train.max_checkpoints)
  state, _ = restore_or_init(built, checkpointer)
  start = int(state.step)
  checkpointer.require_space(state, saves=remaining_saves(config.train, start))
  write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  train_step = built["step"]
  writer = MetricsWriter(workdir, start)
  progress = Progress(config.train.num_steps, config.batch_size, start)
  preemption = Preemption()
  t_loop, t_first, first_logged = time.time(), None, None
  try:
    for step in range(start + 1, config.train.num_steps + 1):
      state, metrics = train_step(state, {}, frozen)
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        scalars = jax.device_get(metrics)
        if t_first is None:   # steady-state timing starts after the first (compiling) log
          t_first, first_logged = time.time(), step
        writer.write(step, scalars)
        progress.log(step, {k: scalars[k] for k in LOGGED if k in scalars})
      if step % config.train.checkpoint_every == 0 or step == config.train.num_steps \
          or preemption.requested:
        checkpointer.save(step, state, {"step": step}, wait=preemption.requested)
      if preemption.requested:
        print(f"SIGTERM: saved step {step} to {checkpointer.directory}; exiting", flush=True)
        return None
    checkpointer.wait()
    t_end = time.time()
  finally:
    writer.close()
    checkpointer.close()
    preemption.restore()   # last: a SIGTERM while the final checkpoint is written only sets the flag
  if preemption.requested:
    print(f"SIGTERM: saved step {config.train.num_steps} to {checkpointer.directory}; exiting "
          "before the probe (rerun the same command to probe)", flush=True)
    return None
  timing = {"train_seconds_this_run": t_end - t_loop}
  if first_logged is not None and int(state.step) > first_logged:
    timing["seconds_per_step"] = (t_end - t_first) / (int(state.step) - first_logged)
  path = os.path.join(workdir, PROBE_FILE)
  if start == config.train.num_steps and os.path.isfile(path):   # probe again, keep the cost
    with open(path) as f:
      timing = {k: v for k, v in json.load(f).items() if k in TIMING} or timing
  report = probe_run(config, recipe, state)
  report.update(timing, step=int(state.step),
                provenance=provenance(workdir, config, int(state.step)))
  write_json_atomic(path, report)
  print(format_probe(report), flush=True)
  return report


def probe_run(config: ml_collections.ConfigDict, recipe, state) -> dict:
  """The linear probe (config.probe) of the student's params, its EMA teacher's (when the recipe
  keeps one) and the random init the run started from (PRNGKey(config.seed))."""
  network = recipe.modules[STUDENT]
  embed_image = towers(network.model).embed_image

  def features(params, images):
    emb, tokens = embed_image(params, images)
    return {"cls": emb, "cell": tokens[:, 1]}

  extractors = {"student": (features, jax.device_get(state.params[STUDENT]))}
  if STUDENT in state.ema:
    extractors["ema_teacher"] = (features, jax.device_get(state.ema[STUDENT]))
  extractors["random_init"] = (features, jax.jit(network.init)(jax.random.PRNGKey(config.seed)))
  p = config.probe
  t0 = time.time()
  report = linear_probe(extractors, load_fashion_mnist(config.data.fashion_mnist_dir or None),
                        num_train=p.num_train, num_test=p.num_test, steps=p.steps,
                        batch_size=p.batch_size, seed=config.seed)
  report["probe_seconds"] = time.time() - t0
  return report
