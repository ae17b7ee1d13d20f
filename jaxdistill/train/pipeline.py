"""Pipelines: several runs chained by init_from, with mining between them, in one resumable
command (paper 000's stages; configs/leaner_faster.py). `methods.train` hands a config with a
`pipeline` section here, with its single-run train and validate functions (this module knows no
recipe).

config.pipeline.stages is data, one dict per stage, each a run in <workdir>/<name>/:

  {"name": "student_image",      directory name (letters, digits, _), unique
   "kind": "train" | "mine",
   # kind train: one `--mode=train` run of config with these fields replaced
   "method": "leaner_faster",    config.method of the run (a registered recipe)
   "model": "student" | "teacher" | "student_image+teacher_text",
                                 the run's network (below)
   "data": "train" | "unpaired", the split it trains on (config.data.train_split)
   "steps": 8,                   config.train.num_steps (0: the pipeline config's)
   "trainable": ((regex, None | {}), ...),          config.trainable
   "init_from": ({"source": "stage:NAME" | "teacher:NAME" | "workdir:PATH" | "pretrained:PATH",
                  "layers": "", "mapping": (...)}, ...),   config.init_from
   "teachers": {"teacher": "stage:NAME" | "teacher:NAME"},  config.teachers.<name> (workdir)
   "bank": "" | "stage:NAME",    a mine stage's banks (config.mining.bank_dir); without one the
                                 recipe section's hard_negatives is set to 0
   "settings": {"leaner_faster.stage": "stage1", ...}}     any other config key of the run
   # kind mine: `--mode=mine` with the towers of an earlier train stage
   {"name": "mine_teacher", "kind": "mine", "tower": "stage:NAME"}

Sources: "stage:NAME" is <workdir>/NAME (an earlier stage), "teacher:NAME" the path of
config.teachers.NAME. Networks: "teacher" is the model of the run at config.teachers.<
pipeline.teacher>; "student" is config.model, whose text tower is the teacher's text tower cut
to its first pipeline.student_text_layers layers when that is > 0 (paper 000 §4.1; 0: the
student's own text tower, e.g. when the widths differ); "student_image+teacher_text" is the
student's image tower with the teacher's whole text tower (paper 000 SF: "share the same text
encoder with the target dual-encoder"). Every network takes the teacher's embed_dim, max_len and
vocabulary (eq. 2-3 compare embeddings; one tokenizer: config.data.tokenizer defaults to the
teacher run's tokenizer.json).

Resume: a train stage whose eval.json reports its last step, or a mine stage whose mine.json
and banks exist, is done and skipped (the same command only: a workdir whose
pipeline_config.json differs from the config is refused, naming the changed keys); the first
stage not done is run again, which resumes from
its own latest checkpoint (or embedding files), so a killed pipeline goes on at the stage and
step where it stopped. Each stage keeps its eval.json; <workdir>/pipeline.json sums them up.

Reuse: config.pipeline.reuse names the workdir of another pipeline whose config differs only in
its `pipeline` section (e.g. Table 2's `full` row of the same preset and seed). A stage of this
pipeline that is done there with the same run config, and reads only stages that were
themselves reused, is copied instead of run (the copy is what the run would give: same config,
same seed, same inputs) and marked with reused_from.json. So the rows of an ablation table
share their common first stages (paper 000's teacher fine-tuning, stage 1, the teacher's mining).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from typing import Any, Callable, Mapping

import jax
import ml_collections

from jaxdistill.atomic import write_json_atomic
from jaxdistill.config import ConfigError, flat_dict, suggest_key, validate, validate_teachers
from jaxdistill.data.negatives import I2T_FILE, T2I_FILE
from jaxdistill.store.provenance import provenance
from jaxdistill.store.run import load_run_config

KINDS = ("train", "mine")
MODELS = ("student", "teacher", "student_image+teacher_text")
DATA = ("train", "unpaired")
TRAIN_KEYS = ("name", "kind", "method", "model", "data", "steps", "trainable", "init_from",
              "teachers", "bank", "settings")
MINE_KEYS = ("name", "kind", "tower")
REQUIRED = {"train": ("name", "kind", "method", "model", "trainable"), "mine": MINE_KEYS}
# The text tower's fields of the `model` section (models/towers.py text_tower, models/dual.py).
TEXT_FIELDS = ("text_tower", "text_width", "text_layers", "text_heads", "text_mlp", "text_pool",
               "bert_max_positions", "bert_type_vocab_size", "bert_layer_norm_eps",
               "bert_hidden_act")
SHARED_FIELDS = ("embed_dim", "max_len", "vocab_size")   # every network of a pipeline: the teacher's
SUMMARY_FILE = "pipeline.json"
CONFIG_FILE = "pipeline_config.json"   # the config the workdir's stages were run with
REUSED_FILE = "reused_from.json"       # in a stage directory copied from pipeline.reuse
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def is_pipeline(config: ml_collections.ConfigDict) -> bool:
  return "pipeline" in config


def _key(i: int, field: str = "") -> str:
  return f"--config.pipeline.stages[{i}]" + (f".{field}" if field else "")


def _stage_ref(value: Any, i: int, field: str, earlier: Mapping[str, str], kind: str,
               config, teacher_ok: bool) -> None:
  """value must read stage:NAME (an earlier stage of `kind`) or, when teacher_ok,
  teacher:NAME (a config.teachers section); else ConfigError naming the key and the fix."""
  ref, sep, name = str(value).partition(":")
  names = [n for n, k in earlier.items() if k == kind]
  if sep and ref == "stage":
    if earlier.get(name) == kind:
      return
    raise ConfigError(f"{_key(i, field)}={value!r} names no earlier {kind} stage: use stage:NAME "
                      f"with NAME one of {names or '(none yet: reorder the stages)'}")
  if sep and ref == "teacher" and teacher_ok:
    if name in config.teachers:
      return
    raise ConfigError(f"{_key(i, field)}={value!r}: config.teachers has no section {name!r} "
                      f"(it has {list(config.teachers)}); add it or fix the name")
  options = "stage:NAME" + (" or teacher:NAME" if teacher_ok else "")
  raise ConfigError(f"{_key(i, field)}={value!r} must read {options} (NAME one of {names})")


def _check_settings(config, settings: Any, i: int) -> None:
  if not isinstance(settings, Mapping):
    raise ConfigError(f"{_key(i, 'settings')} must be a dict {{dotted config key: value}}, "
                      f"got {type(settings).__name__}")
  for dotted in settings:
    node = config
    for part in str(dotted).split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        raise ConfigError(f"{_key(i, 'settings')} sets unknown key {dotted!r}: "
                          f"{suggest_key(config, dotted).replace('--config.', '')}")
      node = node[part]


def validate_pipeline(config: ml_collections.ConfigDict, recipes: tuple[str, ...]) -> None:
  """The stage list's structure, before anything runs: ConfigError naming the key and the fix.
  (Each stage's run config is validated in full when its turn comes: its sources exist then.)"""
  p = config.pipeline
  stages = p.get("stages", ())
  if not stages:
    raise ConfigError("--config.pipeline.stages is empty: list the stages (configs/leaner_faster.py)")
  teacher = p.get("teacher", "teacher")
  uses_teacher = p.get("student_text_layers", 0) > 0 or any(
      s.get("model") in ("teacher", "student_image+teacher_text") for s in stages)
  if uses_teacher:
    validate_teachers(config, [teacher])
  earlier: dict[str, str] = {}
  for i, stage in enumerate(stages):
    if not isinstance(stage, Mapping):
      raise ConfigError(f"{_key(i)} must be a dict (name, kind, ...), got {stage!r}")
    kind = stage.get("kind", "")
    if kind not in KINDS:
      raise ConfigError(f"{_key(i, 'kind')}={kind!r} is not valid: use one of {', '.join(KINDS)}")
    allowed = TRAIN_KEYS if kind == "train" else MINE_KEYS
    for field in stage:
      if field not in allowed:
        raise ConfigError(f"{_key(i, field)} is not a key of a {kind} stage: use only "
                          f"{', '.join(allowed)}")
    for field in REQUIRED[kind]:
      if field not in stage:
        raise ConfigError(f"{_key(i)} ({stage.get('name', '?')}) lacks {field!r}: a {kind} stage "
                          f"needs {', '.join(REQUIRED[kind])}")
    name = stage["name"]
    if not isinstance(name, str) or not _NAME.match(name) or name in earlier:
      raise ConfigError(f"{_key(i, 'name')}={name!r} must be a unique directory name of "
                        f"letters, digits and _ (taken: {list(earlier)})")
    if kind == "mine":
      _stage_ref(stage["tower"], i, "tower", earlier, "train", config, teacher_ok=False)
      earlier[name] = kind
      continue
    if stage["method"] not in recipes:
      raise ConfigError(f"{_key(i, 'method')}={stage['method']!r} has no recipe: use one of "
                        f"{', '.join(recipes)}")
    for field, value, options in (("model", stage["model"], MODELS),
                                  ("data", stage.get("data", "train"), DATA)):
      if value not in options:
        raise ConfigError(f"{_key(i, field)}={value!r} is not valid: use one of {', '.join(options)}")
    steps = stage.get("steps", 0)
    if not isinstance(steps, int) or steps < 0:
      raise ConfigError(f"{_key(i, 'steps')}={steps!r} must be an int >= 0 (0: --config.train.num_steps)")
    rules = stage["trainable"]
    if not rules or any(len(r) != 2 for r in rules):
      raise ConfigError(f"{_key(i, 'trainable')}={rules!r} must be ((regex, None | {{optim "
                        "overrides}}), ...) with a last catch-all rule, e.g. ('.*', {})")
    for j, entry in enumerate(stage.get("init_from", ())):
      if not isinstance(entry, Mapping):
        raise ConfigError(f"{_key(i, f'init_from[{j}]')}={entry!r} must be a dict (source, "
                          "layers, mapping)")
      source = str(entry.get("source", ""))
      if not entry.get("mapping"):
        raise ConfigError(f"{_key(i, f'init_from[{j}]')} needs a mapping: ((destination regex, "
                          "source prefix), ...), e.g. (('student/', 'student/'),)")
      if source.startswith(("stage:", "teacher:")):
        _stage_ref(source, i, f"init_from[{j}].source", earlier, "train", config, teacher_ok=True)
      elif not source.startswith(("workdir:", "pretrained:")):
        raise ConfigError(f"{_key(i, f'init_from[{j}].source')}={source!r} must read stage:NAME, "
                          "teacher:NAME, workdir:PATH or pretrained:PATH")
    teachers = stage.get("teachers", {})
    if not isinstance(teachers, Mapping):
      raise ConfigError(f"{_key(i, 'teachers')} must be a dict {{teacher name: stage:NAME | "
                        "teacher:NAME}}")
    for tname, source in teachers.items():
      _stage_ref(source, i, f"teachers.{tname}", earlier, "train", config, teacher_ok=True)
    if stage.get("bank"):
      _stage_ref(stage["bank"], i, "bank", earlier, "mine", config, teacher_ok=False)
    _check_settings(config, stage.get("settings", {}), i)
    earlier[name] = kind
  if uses_teacher:
    tm = load_run_config(config.teachers[teacher].path, f"--config.teachers.{teacher}.path").model
    if tm.get("kind", "dual") != "dual":
      raise ConfigError(f"--config.teachers.{teacher}.path={config.teachers[teacher].path!r} is a "
                        f"{tm.kind} run: the pipeline's teacher must be a dual encoder "
                        "(configs/teacher.py:dual or :dual_minilm)")
    n = p.get("student_text_layers", 0)
    if n > tm.text_layers:
      raise ConfigError(f"--config.pipeline.student_text_layers={n} exceeds the teacher's "
                        f"{tm.text_layers} text layers: use at most {tm.text_layers} (0: the "
                        "student's own text tower, config.model)")


# ------------------------------------------------------------------------------ stage configs

def _source(value: str, workdir: str, config) -> str:
  """stage:NAME -> <workdir>/NAME; teacher:NAME -> config.teachers.NAME.path."""
  ref, _, name = value.partition(":")
  return os.path.join(workdir, name) if ref == "stage" else config.teachers[name].path


def stage_model(config: ml_collections.ConfigDict, which: str) -> ml_collections.ConfigDict:
  """The `model` section of a stage's network (module docstring)."""
  p = config.pipeline
  teacher = load_run_config(config.teachers[p.get("teacher", "teacher")].path).model
  if which == "teacher":
    return ml_collections.ConfigDict(teacher.to_dict())
  model = ml_collections.ConfigDict(config.model.to_dict())
  n = p.get("student_text_layers", 0)
  if which == "student_image+teacher_text" or n > 0:
    for field in TEXT_FIELDS:
      if field in teacher:
        model[field] = teacher[field]
    if which == "student":
      model.text_layers = n
  for field in SHARED_FIELDS:
    model[field] = teacher[field]
  return model


def _set(config, dotted: str, value) -> None:
  node = config
  *parents, leaf = dotted.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value


def stage_config(config: ml_collections.ConfigDict, index: int, workdir: str
                 ) -> ml_collections.ConfigDict:
  """The run config of train stage `index`: the pipeline config with the stage's fields put in
  (sources resolved to paths) and no `pipeline` section."""
  stage = config.pipeline.stages[index]
  c = copy.deepcopy(config)
  with c.unlocked():
    del c["pipeline"]
    c.method = stage["method"]
    if stage["method"] not in c:
      c[stage["method"]] = ml_collections.ConfigDict()
    c.model = stage_model(config, stage["model"])
    c.data.train_split = stage.get("data", "train")
    teacher = config.teachers.get(config.pipeline.get("teacher", "teacher"))
    if not c.data.tokenizer and teacher is not None and teacher.path:
      c.data.tokenizer = os.path.join(teacher.path, "tokenizer.json")   # one vocabulary
    c.train.num_steps = stage.get("steps", 0) or config.train.num_steps
    c.trainable = tuple(tuple(r) for r in stage["trainable"])
    entries = []
    for entry in stage.get("init_from", ()):
      entry = dict(entry)
      if entry["source"].startswith(("stage:", "teacher:")):
        entry["source"] = "workdir:" + _source(entry["source"], workdir, config)
      entries.append(entry)
    c.init_from = tuple(entries)
    for tname, source in stage.get("teachers", {}).items():
      section = copy.deepcopy(c.teachers[tname]) if tname in c.teachers else None
      c.teachers[tname] = section or ml_collections.ConfigDict(
          dict(kind="workdir", path="", dtype="float32", shard=False))
      c.teachers[tname].kind = "workdir"
      c.teachers[tname].path = _source(source, workdir, config)
    section = c[c.method]
    if stage.get("bank"):
      c.mining.bank_dir = os.path.join(_source(stage["bank"], workdir, config), "bank")
    elif "hard_negatives" in section:
      section.hard_negatives = 0
    for dotted, value in stage.get("settings", {}).items():
      _set(c, dotted, value)
  return c


def mine_config(config: ml_collections.ConfigDict, index: int, workdir: str
                ) -> ml_collections.ConfigDict:
  """The `--mode=mine` config of mine stage `index`: banks in <workdir>/<name>/bank."""
  stage = config.pipeline.stages[index]
  c = copy.deepcopy(config)
  with c.unlocked():
    del c["pipeline"]
    c.mining.tower_workdir = _source(stage["tower"], workdir, config)
    c.mining.bank_dir = os.path.join(workdir, stage["name"], "bank")
  return c


# ------------------------------------------------------------------------------ running

def stage_done(config: ml_collections.ConfigDict, index: int, workdir: str) -> bool:
  """A train stage is done when its eval.json reports its last step; a mine stage when its
  mine.json and both banks exist (all written atomically, last)."""
  stage = config.pipeline.stages[index]
  directory = os.path.join(workdir, stage["name"])
  if stage["kind"] == "mine":
    return all(os.path.isfile(os.path.join(directory, *parts)) for parts in
               (("mining", "mine.json"), ("bank", I2T_FILE), ("bank", T2I_FILE)))
  path = os.path.join(directory, "eval.json")
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    step = json.load(f).get("step")
  return step == (stage.get("steps", 0) or config.train.num_steps)


def _summary_entry(config, index: int, workdir: str) -> dict:
  stage = config.pipeline.stages[index]
  directory = os.path.join(workdir, stage["name"])
  entry = {"name": stage["name"], "kind": stage["kind"], "workdir": directory}
  marker = os.path.join(directory, REUSED_FILE)
  if os.path.isfile(marker):
    with open(marker) as f:
      entry["reused_from"] = json.load(f)["source"]
  path = os.path.join(directory, "eval.json" if stage["kind"] == "train" else "mining/mine.json")
  if os.path.isfile(path):
    with open(path) as f:
      result = json.load(f)
    if stage["kind"] == "train":
      entry["step"] = result.get("step")
      entry["dual"] = result.get("dual", {})
    else:
      entry["tower_workdir"] = result.get("tower_workdir")
  return entry


def _refs(stage: Mapping) -> set[str]:
  """Names of the earlier stages a stage reads: init_from sources, teachers, bank, tower."""
  values = [entry.get("source", "") for entry in stage.get("init_from", ())]
  values += list(stage.get("teachers", {}).values())
  values += [stage.get("bank", ""), stage.get("tower", "")]
  return {str(v).partition(":")[2] for v in values if str(v).startswith("stage:")}


def reused_pipeline(current: dict, reuse: str) -> ml_collections.ConfigDict:
  """The config of the pipeline at `reuse` (config.pipeline.reuse), after checking that it equals
  `current` (JSON) outside the `pipeline` section; ConfigError naming the fix."""
  path = os.path.join(reuse, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f"--config.pipeline.reuse={reuse!r} holds no pipeline run ({path} is "
                      "missing): name the --workdir of an earlier run of this pipeline, e.g. "
                      "the full row of the same preset and seed, or leave it empty")
  with open(path) as f:
    stored = json.load(f)
  shown = _changed_keys(stored, current, "{k} ({old!r} there, {new!r} here)", skip="pipeline.")
  if shown:
    raise ConfigError(f"--config.pipeline.reuse={reuse!r} ran another config: {shown}. Only the "
                      "pipeline section may differ for its stages to be reused: reuse a run "
                      "with these settings, or leave --config.pipeline.reuse empty")
  return ml_collections.ConfigDict(stored)


def _changed_keys(stored: dict, now: dict, form: str, skip: str = "") -> str:
  """The dotted keys in which two configs (JSON) differ, the first 4 written as `form`
  ({k}, {old}, {new}) and a count of the rest; "" when they agree (keys under `skip` aside)."""
  a, b = flat_dict(stored), flat_dict(now)
  changed = sorted(k for k in a.keys() | b.keys()
                   if not (skip and k.startswith(skip)) and a.get(k) != b.get(k))
  shown = ", ".join(form.format(k=k, old=a.get(k), new=b.get(k)) for k in changed[:4])
  return shown + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def stage_run_json(config: ml_collections.ConfigDict, index: int, workdir: str) -> str:
  """Stage `index`'s run config (train or mine) as JSON, its workdir's paths as <workdir>/...:
  two stages with the same text do the same thing given the same earlier stages."""
  if config.pipeline.stages[index]["kind"] == "mine":
    c = mine_config(config, index, workdir)
  else:
    c = stage_config(config, index, workdir)
  return c.to_json_best_effort(sort_keys=True).replace(os.path.join(workdir, ""), "<workdir>/")


def reusable(config, index: int, other, reuse: str, reused: set[str], workdir: str) -> bool:
  """Whether stage `index` can be copied from the pipeline `other` (its config) at `reuse`: a
  stage of the same name and run config is done there, and every stage it reads is in
  `reused` (copied, so the same inputs)."""
  stage = config.pipeline.stages[index]
  names = [s["name"] for s in other.pipeline.stages]
  if stage["name"] not in names or not _refs(stage) <= reused:
    return False
  j = names.index(stage["name"])
  return (stage_done(other, j, reuse)
          and stage_run_json(other, j, reuse) == stage_run_json(config, index, workdir))


def _copy_stage(source: str, directory: str) -> None:
  """source -> directory through a temporary name (an interrupted copy is never a stage), with
  REUSED_FILE in it; a partial run of the stage at `directory` is replaced."""
  tmp = directory + ".reuse-tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(source, tmp, symlinks=True)
  write_json_atomic(os.path.join(tmp, REUSED_FILE), {"source": os.path.abspath(source)})
  shutil.rmtree(directory, ignore_errors=True)
  os.rename(tmp, directory)


def _check_same_pipeline(current: dict, workdir: str) -> None:
  """A workdir holds one pipeline: its stages are skipped as done by their files alone, so
  resuming with another config would silently mix two pipelines. Raises naming the keys."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    shown = _changed_keys(json.load(f), current, "{k} ({old!r} -> {new!r})")
  if shown:
    raise ConfigError(f"--workdir={workdir} holds a pipeline run with another config ({path}): "
                      f"{shown}. Its finished stages would be reused as they are: run "
                      "the changed pipeline in a new --workdir (or delete this one)")


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, train: Callable,
                 validate_run: Callable, recipes: tuple[str, ...]) -> dict | None:
  """Runs the stages of config.pipeline in order in <workdir>/<name>/, skipping those done.

  train(config, workdir) -> results | None (None: stopped by SIGTERM after saving): one
  `--mode=train` run; validate_run(config): its recipe's checks. Returns the summary written
  to <workdir>/pipeline.json, or None when a stage was stopped (run the same command again to
  go on)."""
  validate_pipeline(config, recipes)
  current = json.loads(config.to_json_best_effort())
  reuse = config.pipeline.get("reuse", "")
  if reuse and os.path.realpath(reuse) == os.path.realpath(workdir):
    raise ConfigError(f"--config.pipeline.reuse={reuse!r} is this --workdir: name another "
                      "pipeline's workdir, or leave it empty")
  other = reused_pipeline(current, reuse) if reuse else None
  os.makedirs(workdir, exist_ok=True)
  _check_same_pipeline(current, workdir)
  write_json_atomic(os.path.join(workdir, CONFIG_FILE), current)
  stages = config.pipeline.stages
  reused: set[str] = set()
  for i, stage in enumerate(stages):
    name, kind = stage["name"], stage["kind"]
    directory = os.path.join(workdir, name)
    head = f"pipeline stage {i + 1}/{len(stages)} {name} ({kind})"
    if stage_done(config, i, workdir):
      print(f"{head}: done, skipped", flush=True)
      if os.path.isfile(os.path.join(directory, REUSED_FILE)):
        reused.add(name)
      continue
    if other is not None and reusable(config, i, other, reuse, reused, workdir):
      _copy_stage(os.path.join(reuse, name), directory)
      reused.add(name)
      print(f"{head}: reused from {os.path.join(reuse, name)}", flush=True)
      continue
    print(f"{head}: {directory}", flush=True)
    if kind == "mine":
      from jaxdistill.mining.run import run as mine   # ScaNN is imported only when mining
      c = mine_config(config, i, workdir)
      validate(c, jax.device_count(), "mine")
      mine(c, directory)
    else:
      c = stage_config(config, i, workdir)
      validate(c, jax.device_count(), "train")
      validate_run(c)
      if train(c, directory) is None:
        print(f"{head}: stopped; run the same command again to resume it", flush=True)
        return None
    write_json_atomic(os.path.join(workdir, SUMMARY_FILE),
                      {"stages": [_summary_entry(config, j, workdir) for j in range(i + 1)]})
  summary = {"stages": [_summary_entry(config, j, workdir) for j in range(len(stages))],
             "provenance": provenance(workdir, config, None)}   # each stage's: its eval.json
  write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)
  for entry in summary["stages"]:
    if entry["kind"] == "train":
      rsum = entry.get("dual", {}).get("rsum")
      print(f"pipeline {entry['name']}: step {entry.get('step')}, R@sum {rsum}", flush=True)
  return summary
