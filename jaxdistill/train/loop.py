"""The trainer, top to bottom: mesh -> input -> recipe -> input stream -> shardings -> state
(resume > init_from > random) -> step -> loop (log, checkpoint, preemption) -> evaluation.

Knows no method: `train_and_evaluate` gets a `build_recipe(config, mesh, data, steps_per_epoch) -> Recipe`
(methods/ hands its registry in). Everything else it reads from the config, as data:
config.trainable (optimiser rules), config.sharding (partition rules), config.init_from.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from jaxdistill.atomic import write_json_atomic
from jaxdistill.config import flat_dict, sharding_rules
from jaxdistill.data import pipeline
from jaxdistill.data.datasets import prepare_data, train_split_name
from jaxdistill.evaluate.plots import write_plots
from jaxdistill.evaluate.run import evaluate_and_report, write_eval_results
from jaxdistill.models.build import towers
from jaxdistill.parallel import sharding
from jaxdistill.parallel.mesh import make_mesh, replicated
from jaxdistill.progress import Progress
from jaxdistill.store.checkpoint import Checkpointer, abstract_like
from jaxdistill.store.run import STUDENT, load_run
from jaxdistill.teachers.cache import FeatureCache, add_cached_features
from jaxdistill.train.init import apply_init_from
from jaxdistill.train.metrics import MetricsWriter, NoMetricsWriter, SkipCounter
from jaxdistill.train.optim import make_optimizer, trainable_mask
from jaxdistill.train.state import create_train_state
from jaxdistill.train.step import make_train_step

LOGGED = ("loss", "itc", "itm", "mlm", "distill")   # shown on the progress line when present


class Preemption:
  """Turns SIGTERM into a flag the loop polls after each step (then: save, exit 0). Outside the
  loop main.py's handler applies (stop at once, one line, exit 0).

  With several processes each one's flag is its own (SIGTERM may reach them at different steps):
  `agreed()` is a collective every process calls after the same step; it is True on all of them
  once any one has been signalled, so all save the same step and stop together."""

  def __init__(self):
    self.requested = False   # this process got SIGTERM
    self._agreed = False     # some process did (what `agreed()` last found)
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process has been signalled (one tiny all-gather when there are several; every
    process must call it after the same step)."""
    if jax.process_count() == 1:
      self._agreed = self.requested
    elif not self._agreed:
      from jax.experimental import multihost_utils
      flags = multihost_utils.process_allgather(np.int32(self.requested))
      self._agreed = bool(np.any(flags))
    return self._agreed

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def remaining_saves(train: ml_collections.ConfigDict, start: int) -> int:
  """How many checkpoints a run from step `start` writes (every checkpoint_every, and the last)."""
  last, every = train.num_steps, train.checkpoint_every
  return last // every - start // every + (last % every != 0) if start < last else 0


def build_state(recipe, config: ml_collections.ConfigDict, mesh, batch_spec: Any) -> dict:
  """Optimiser, shardings and the initial-state function of `recipe` (nothing is computed yet).

  Returns {"tx", "trainable", "shardings" (state, batch, frozen, metrics), "abstract",
  "init" (() -> state, random init then config.init_from), "step" (the jitted train step of
  recipe.loss_fn: (state, batch, frozen) -> (state, metrics)), "warmup_step" (the same for the
  recipe's warm-up loss, or None)}."""
  key = jax.random.PRNGKey(config.seed)
  names = list(recipe.modules)

  def init_params(k):   # the first module takes the seed's key itself, the others fold_in(k, i)
    return {m: recipe.modules[m].init(k if i == 0 else jax.random.fold_in(k, i))
            for i, m in enumerate(names)}

  abstract_params = jax.eval_shape(init_params, key)
  tx = make_optimizer(config.optim, config.trainable, abstract_params, config.train.num_steps)
  extra = recipe.init_extra if recipe.init_extra is not None else dict
  make = lambda params: create_train_state(params, tx, key, tuple(recipe.ema), extra())
  abstract = jax.eval_shape(make, abstract_params)
  rules, min_size = sharding_rules(config), config.sharding.min_fsdp_size
  shardings = {
      "state": sharding.tree_shardings(abstract, mesh, rules, min_size),
      "batch": sharding.tree_shardings(batch_spec, mesh, rules, min_size, prefix="batch"),
      "frozen": sharding.tree_shardings(recipe.frozen, mesh, rules, min_size, prefix="frozen"),
      "metrics": replicated(mesh),
  }

  def init():
    params = jax.jit(init_params, out_shardings=shardings["state"].params)(key)
    if config.init_from:
      params, log = apply_init_from(jax.device_get(params), config.init_from)
      for line in log:
        print(line, flush=True)
    return jax.jit(make, out_shardings=shardings["state"])(params)

  trainable = trainable_mask(abstract_params, config.trainable)
  step_of = lambda loss_fn: make_train_step(loss_fn, tx, dict(recipe.ema), trainable, shardings)
  return {"tx": tx, "trainable": trainable, "shardings": shardings, "abstract": abstract,
          "init": init, "step": step_of(recipe.loss_fn),
          "warmup_step": step_of(recipe.warmup[1]) if recipe.warmup is not None else None}


def restore_or_init(built: dict, checkpointer: Checkpointer) -> tuple[Any, dict | None]:
  """The state a run starts from: its latest checkpoint and that checkpoint's metadata, or
  (built["init"](): config.init_from over the random init, None); prints which, and how the
  state is sharded. built: `build_state`'s result."""
  start = checkpointer.latest_step()
  if start is not None:
    abstract = abstract_like(built["abstract"], built["shardings"]["state"])
    state, meta = checkpointer.restore(abstract, start)
    print(f"resumed from {checkpointer.directory}/{start}", flush=True)
  else:
    state, meta = built["init"](), None
  print(sharding.describe(state), flush=True)
  return state, meta


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       build_recipe: Callable) -> dict | None:
  """Trains the recipe `build_recipe(config, mesh, data, steps_per_epoch)` in `workdir` (resuming from its latest
  checkpoint) and evaluates its student. Returns the evaluation results, or None when stopped
  early by SIGTERM (after saving)."""
  os.makedirs(workdir, exist_ok=True)
  # --- mesh ---
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  # --- input ---
  data = prepare_data(config, workdir)
  with config.unlocked():
    data.fill_model_inputs(config)   # vocab_size (+ real data: image size, normalisation)
  split_name = train_split_name(config)   # "unpaired": paper 000's stage-1 pool
  steps_per_epoch = max(data.num_train(split_name) // config.batch_size, 1)
  # --- recipe ---
  recipe = build_recipe(config, mesh, data, steps_per_epoch)
  # --- input stream (+ teachers' own token ids, cached teacher features) ---
  data_iter = iter(data.train_dataset(config, split_name, process_index=jax.process_index(),
                                      process_count=jax.process_count(), texts=recipe.batch_texts))
  skipped = SkipCounter()
  features = {name: FeatureCache(path) for name, path in recipe.batch_features.items()}
  next_batch = lambda: add_cached_features(skipped.take(next(data_iter)), features)
  # --- shardings, state (resume > init_from > random) ---
  first = data_iter.get_state()
  batch_spec = pipeline.global_batch_spec(next_batch())
  skipped.reset()
  data_iter.set_state(first)
  built = build_state(recipe, config, mesh, batch_spec)
  shardings = built["shardings"]
  frozen = jax.device_put(_host_copy(recipe.frozen), shardings["frozen"])
  checkpointer = Checkpointer(workdir, config.train.max_checkpoints)
  state, meta = restore_or_init(built, checkpointer)
  if meta is not None:
    data_iter.set_state(meta["data_iterator"])
    skipped.restore(meta.get("skipped", {}))
  start = int(state.step)
  checkpointer.require_space(state, saves=remaining_saves(config.train, start))   # now, not later
  primary = jax.process_index() == 0   # writes the run's shared files; every process saves checkpoints
  if primary:
    write_json_atomic(os.path.join(workdir, "config.json"),
                      json.loads(config.to_json_best_effort()))
  # --- step ---
  train_step = built["step"]
  warmup_steps, warmup_step = 0, None
  if recipe.warmup is not None and start < recipe.warmup[0]:
    warmup_steps, warmup_step = recipe.warmup[0], built["warmup_step"]
  student = towers(recipe.modules[STUDENT].model)
  # --- loop ---
  writer = MetricsWriter(workdir, start) if primary else NoMetricsWriter()
  progress = Progress(config.train.num_steps, config.batch_size, start)
  preemption = Preemption()
  t_loop = time.time()
  try:
    for step in range(start + 1, config.train.num_steps + 1):
      batch = pipeline.to_global_batch(next_batch(), shardings["batch"])
      step_fn = warmup_step if step <= warmup_steps else train_step   # state.step = step - 1
      state, metrics = step_fn(state, batch, frozen)
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        scalars = jax.device_get(metrics)
        writer.write(step, {**scalars, **skipped.metrics()})
        if primary:
          progress.log(step, {**{k: scalars[k] for k in LOGGED if k in scalars},
                              **skipped.metrics(nonzero=True)})
      stop = preemption.agreed()
      if step % config.train.checkpoint_every == 0 or step == config.train.num_steps or stop:
        checkpointer.save(step, state, {"data_iterator": data_iter.get_state(), "step": step,
                                        "skipped": skipped.totals},
                          wait=stop)
      if stop:
        print(f"SIGTERM: saved step {step} to {checkpointer.directory}; exiting", flush=True)
        return None
      if config.train.eval_every and step % config.train.eval_every == 0 \
          and step != config.train.num_steps:
        results = evaluate_and_report(student, _local_params(state.params[STUDENT]),
                                      data.eval_split("val"), config, verbose=primary)
        writer.write(step, {f"val/{k}": v for k, v in results["dual"].items()})
    checkpointer.wait()
    train_seconds = time.time() - t_loop
  finally:
    writer.close()
    checkpointer.close()
    preemption.restore()   # last: a SIGTERM while the final checkpoint is written only sets the flag
  if preemption.agreed():   # arrived after the last step's check; its checkpoint is complete
    print(f"SIGTERM: saved step {config.train.num_steps} to {checkpointer.directory}; exiting "
          "before the evaluation (rerun the same command to evaluate)", flush=True)
    return None
  # --- evaluation ---
  results = evaluate_and_report(student, _local_params(state.params[STUDENT]),
                                data.eval_split(config.eval.split), config, verbose=primary)
  results["train_seconds_this_run"] = train_seconds
  results["train_items_skipped"] = skipped.totals
  results["step"] = int(state.step)
  write_eval_results(workdir, "eval.json", results, config, results["step"])
  _write_plots(workdir)
  return results


def _host_copy(tree: Any) -> Any:
  """`tree` as it is with one process; with several, its arrays on one process's devices (a
  teacher's params restored there) as host arrays, which device_put may place on a mesh spanning
  every process (jax does not move arrays between hosts)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array)
                      and x.is_fully_addressable else x, tree)


def _local_params(params: Any) -> Any:
  """`params` as they are with one process; with several, a full copy on this process's host (the
  evaluation then runs on each process's own devices, no collective: a process that stops early,
  e.g. on SIGTERM, leaves the others evaluating; only process 0 writes the results)."""
  if jax.process_count() == 1:
    return params
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(params, tiled=True)


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=eval: re-evaluates the latest checkpoint of `workdir` (its network and params only;
  the recipe and its teachers are not built). Never replaces the training run's eval.json: writes
  `eval_name(...)` (eval_<split>.json, with a settings hash when the data or eval settings differ
  from the run's), each with its CLIP_benchmark-format clip_benchmark_<...>.json (evaluate/run.py).
  Rerunning the training command re-evaluates into eval.json."""
  run = load_run(workdir)
  data = prepare_data(config, workdir)
  split = config.eval.split
  differs = settings_differ(run.config, config)
  results = evaluate_and_report(run.towers, run.params, data.eval_split(split), config)
  results["step"] = run.step
  if differs:
    results["settings_differ_from_training"] = differs
  name = eval_name(split, config, differs)
  write_eval_results(workdir, name, results, config, run.step)
  print(f"results: {os.path.join(workdir, name)}", flush=True)
  _write_plots(workdir)
  return results


# The sections of a config that decide what an evaluation measured (the model is the checkpoint's).
_EVAL_SECTIONS = ("data", "eval")


def settings_differ(trained: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> dict:
  """{"data.seed": {"training": 0, "evaluated": 1}, ...}: the data and eval settings (eval.split
  aside) in which `config` differs from the run's training config."""
  def settings(c):
    c = json.loads(c.to_json_best_effort()) if hasattr(c, "to_json_best_effort") else c
    flat = flat_dict({s: c.get(s, {}) for s in _EVAL_SECTIONS})
    flat.pop("eval.split", None)
    return flat
  before, after = settings(trained), settings(config)
  return {k: {"training": before.get(k), "evaluated": after.get(k)}
          for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def eval_name(split: str, config: ml_collections.ConfigDict, differs: dict) -> str:
  """eval_<split>.json, or eval_<split>_<sha256[:8] of the data and eval settings>.json when they
  differ from training's (`differs`), so evaluations on other data never share a file."""
  if not differs:
    return f"eval_{split}.json"
  settings = json.loads(config.to_json_best_effort(sort_keys=True))
  blob = json.dumps({s: settings.get(s) for s in _EVAL_SECTIONS}, sort_keys=True)
  return f"eval_{split}_{hashlib.sha256(blob.encode()).hexdigest()[:8]}.json"


def _write_plots(workdir: str) -> None:
  """Writes <workdir>/plots/*.png (evaluate/plots.py) on the first process; prints the paths."""
  if jax.process_index() == 0:
    for path in write_plots(workdir):
      print(f"plot: {path}", flush=True)
