"""The training loop, top to bottom: mesh -> input -> recipe -> state (restore) -> step -> loop
(log, checkpoint, preemption) -> evaluation. Knows no method: recipes come from `methods`.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import ml_collections

from jaxdistill import methods
from jaxdistill.data import pipeline
from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.evaluate.plots import write_plots
from jaxdistill.evaluate.report import write_json_atomic
from jaxdistill.evaluate.run import evaluate_and_report
from jaxdistill.mining.bank import training_negatives
from jaxdistill.parallel.mesh import batch_sharding, make_mesh
from jaxdistill.train.checkpoint import Checkpointer, abstract_like
from jaxdistill.train.metrics import MetricsWriter, Progress
from jaxdistill.train.optim import make_optimizer
from jaxdistill.train.state import TrainState, create_train_state
from jaxdistill.train.step import make_train_step, state_shardings


class _Preemption:
  """Turns SIGTERM into a flag the loop polls after each step (then: save, exit 0)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _init_state(recipe, tx, mesh, key) -> tuple[TrainState, object]:
  """Creates the state directly with its shardings (no host copy of the params)."""
  make = lambda k: create_train_state(
      recipe.init_params(k), tx, with_ema=recipe.ema_momentum > 0,
      recipe_state=None if recipe.init_recipe_state is None else recipe.init_recipe_state())
  shardings = state_shardings(mesh, jax.eval_shape(make, key))
  return jax.jit(make, out_shardings=shardings)(key), shardings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Trains `config.method` in `workdir` (resuming from its latest checkpoint) and evaluates.

  Returns the evaluation results, or None when stopped early by SIGTERM (after saving)."""
  os.makedirs(workdir, exist_ok=True)
  # --- mesh ---
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  # --- input ---
  bench = prepare_benchmark(config, workdir)
  with config.unlocked():
    config.model.vocab_size = bench.vocab_size
  train_split = bench.splits["train"]
  steps_per_epoch = max(len(train_split.image_ids) // config.batch_size, 1)
  dataset = pipeline.train_dataset(
      train_split, *bench.tokens["train"], global_batch_size=config.batch_size,
      group_size=config.data.group_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      negatives=training_negatives(config, train_split.image_ids, bench.tokens["train"][0].shape[1]))
  data_iter = iter(dataset)
  data_sharding = batch_sharding(mesh)
  # --- recipe, optimiser, state ---
  recipe = methods.build(config, mesh, steps_per_epoch)
  tx = make_optimizer(config.optim, config.train.num_steps)
  state, shardings = _init_state(recipe, tx, mesh, jax.random.PRNGKey(config.seed))
  checkpointer = Checkpointer(workdir, config.train.max_checkpoints)
  start = checkpointer.latest_step()
  if start is not None:
    state, meta = checkpointer.restore(abstract_like(state, shardings), start)
    data_iter.set_state(meta["data_iterator"])
    print(f"resumed from {checkpointer.directory}/{start}", flush=True)
  start = int(state.step)
  _write_config(config, workdir)
  # --- step ---
  train_step = make_train_step(recipe, tx, mesh, shardings)
  # --- loop ---
  writer = MetricsWriter(workdir)
  progress = Progress(config.train.num_steps, config.batch_size, start)
  preemption = _Preemption()
  t_loop = time.time()
  try:
    for step in range(start + 1, config.train.num_steps + 1):
      batch = pipeline.to_global_batch(next(data_iter), data_sharding)
      state, metrics = train_step(state, batch, recipe.teacher_params)
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        scalars = jax.device_get(metrics)
        writer.write(step, scalars)
        progress.log(step, {k: scalars[k] for k in ("loss", "itc", "itm", "mlm", "distill")
                            if k in scalars})
      if step % config.train.checkpoint_every == 0 or step == config.train.num_steps \
          or preemption.requested:
        checkpointer.save(step, state, {"data_iterator": data_iter.get_state(), "step": step},
                          wait=preemption.requested)
      if preemption.requested:
        print(f"SIGTERM: saved step {step} to {checkpointer.directory}; exiting", flush=True)
        return None
      if config.train.eval_every and step % config.train.eval_every == 0 \
          and step != config.train.num_steps:
        results = evaluate_and_report(recipe, state.params, bench, config, split="val")
        writer.write(step, {f"val/{k}": v for k, v in results["dual"].items()})
    checkpointer.wait()
    train_seconds = time.time() - t_loop
  finally:
    preemption.restore()
    writer.close()
    checkpointer.close()
  # --- evaluation ---
  results = evaluate_and_report(recipe, state.params, bench, config, split=config.eval.split)
  results["train_seconds_this_run"] = train_seconds
  results["step"] = int(state.step)
  write_json_atomic(os.path.join(workdir, "eval.json"), results)
  _write_plots(workdir)
  return results


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=eval: re-evaluates the latest checkpoint of `workdir`."""
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  bench = prepare_benchmark(config, workdir)
  with config.unlocked():
    config.model.vocab_size = bench.vocab_size
  steps_per_epoch = max(len(bench.splits["train"].image_ids) // config.batch_size, 1)
  recipe = methods.build(config, mesh, steps_per_epoch)
  tx = make_optimizer(config.optim, config.train.num_steps)
  state, shardings = _init_state(recipe, tx, mesh, jax.random.PRNGKey(config.seed))
  checkpointer = Checkpointer(workdir, config.train.max_checkpoints)
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first with "
                            f"--mode=train --workdir={workdir}")
  state, _ = checkpointer.restore(abstract_like(state, shardings))
  checkpointer.close()
  results = evaluate_and_report(recipe, state.params, bench, config, split=config.eval.split)
  results["step"] = int(state.step)
  write_json_atomic(os.path.join(workdir, "eval.json"), results)
  _write_plots(workdir)
  return results


def _write_plots(workdir: str) -> None:
  """Writes <workdir>/plots/*.png (evaluate/plots.py) on the first process; prints the paths."""
  if jax.process_index() == 0:
    for path in write_plots(workdir):
      print(f"plot: {path}", flush=True)


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
