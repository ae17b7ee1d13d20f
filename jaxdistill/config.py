"""Shared config defaults (data, model, optimiser, loop, evaluation) and config validation.

Recipe configs in `configs/` start from `base_config(preset)` and add their own section.
Presets: "tiny" (seconds, for tests), "cpu" (the default: ~15 minutes on a 2-core CPU),
"paper" (paper 003 §4.1 sizes and optimiser values).

`validate(config, num_devices)` runs before anything is compiled and raises `ConfigError`
with one message naming the key and the fix.
"""

from __future__ import annotations

import difflib
import os

import ml_collections
from jaxdistill.errors import JaxDistillError

PRESETS = ("tiny", "cpu", "paper")
EXPORT_QUANTIZATIONS = ("none", "float16", "int8")   # export/tflite.py


class ConfigError(JaxDistillError, ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def _model(preset: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.image_size = 56
  m.channels = 1
  m.patch_size = 28           # one token per 28x28 cell of the 2x2 grid
  m.stem = "conv"
  m.image_pool = "concat"     # per-cell slots in the image embedding (see docs/results.md)
  m.temperature_init = 0.07   # paper 003 eq. 2 / ALBEF
  m.dropout_rate = 0.0
  m.vocab_size = 256          # filled in from the built tokenizer
  m.max_len = 32
  if preset == "tiny":
    width, layers, heads, mlp, embed = 32, 1, 2, 64, 32
  elif preset == "cpu":
    width, layers, heads, mlp, embed = 128, 2, 4, 256, 128
  else:  # paper: ViT-B (12 x 768), 6-layer text, 6-layer cross (paper 003 §3, Fig. 3)
    width, layers, heads, mlp, embed = 768, 6, 12, 3072, 256
    m.patch_size = 14         # ViT-B/16 tiles 384 px; 14 tiles the 56 px benchmark grid
    m.stem = "linear"
  m.vision_width, m.vision_layers, m.vision_heads, m.vision_mlp = width, layers, heads, mlp
  m.text_width, m.text_layers, m.text_heads, m.text_mlp = width, layers, heads, mlp
  m.cross_width, m.cross_layers, m.cross_heads, m.cross_mlp = width, layers, heads, mlp
  m.embed_dim = embed
  if preset == "paper":
    m.vision_layers = 12
  return m


def base_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ConfigError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)} "
                      "(e.g. --config=configs/loopitr.py:cpu)")
  tiny, paper = preset == "tiny", preset == "paper"
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.batch_size = 16 if tiny else (256 if paper else 128)   # global batch

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  d = c.data = ml_collections.ConfigDict()
  d.fashion_mnist_dir = ""       # "" = search /usr/share/datasets/fashion-mnist
  d.seed = 0                     # benchmark generator seed (splits, captions, groups)
  d.num_train = 256 if tiny else 8000
  d.num_val = 32 if tiny else 500
  d.num_test = 64 if tiny else 1000
  d.group_size = 4               # batches of position-only look-alike / swap groups
  d.swap_fraction = 0.5
  d.vocab_size = 256

  c.model = _model(preset)

  o = c.optim = ml_collections.ConfigDict()
  o.learning_rate = 1e-4 if paper else 3e-4   # paper 003 §4.1: 1e-4, wd 0.02, cosine to 1e-5
  o.end_learning_rate = 1e-5 if paper else 1e-5
  o.weight_decay = 0.02
  o.warmup_steps = 1000 if paper else (2 if tiny else 50)
  o.b1, o.b2 = 0.9, 0.999
  o.grad_clip_norm = 0.0                       # 0 = off

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 8 if tiny else (30_000 if paper else 600)
  t.log_every = 1 if tiny else 20
  t.checkpoint_every = 2 if tiny else 200
  t.max_checkpoints = 2
  t.eval_every = 0               # 0 = evaluate only at the end

  e = c.eval = ml_collections.ConfigDict()
  e.split = "test"
  e.batch_size = 64 if tiny else 250
  e.rerank_k = 16                # paper 003 Table 13: re-rank the dual encoder's top-k
  e.pair_batch_size = 256 if tiny else 1024

  x = c.export = ml_collections.ConfigDict()   # --mode=export: TFLite towers (export/)
  x.quantization = "none"        # none | float16 | int8 (dynamic range: int8 weights, float math)
  x.parity_split = "test"        # held-out split for the TFLite-vs-JAX parity check
  x.image_batch_size = 1         # static batch of image_encoder.tflite (1: phone; more: indexing)

  te = c.teacher = ml_collections.ConfigDict()   # frozen teacher + its feature cache (teachers/)
  te.kind = ""                   # "" (none) | workdir | pretrained | lit
  te.path = ""                   # teacher workdir (workdir, lit) or checkpoint (pretrained)
  te.dtype = "float32"           # float32 | bfloat16 (params and compute; outputs float32)
  te.shard = False               # shard teacher params over the mesh's fsdp axis
  te.cache_dir = ""              # --mode=cache_teacher output; "" = <workdir>/teacher_cache
  te.cache_splits = "train"      # comma-separated splits to cache
  te.top_n = 16                  # cross teacher: scores of each example's top-N (paper 002 §3.2.2)
  te.batch_size = 64 if tiny else 256

  mi = c.mining = ml_collections.ConfigDict()   # --mode=mine + hard-negative banks (mining/)
  mi.tower_workdir = ""          # workdir of the trained run whose towers embed the corpus
  mi.bank_dir = ""               # banks: written by --mode=mine ("" = <workdir>/bank), read by
                                 # training when the recipe section's hard_negatives > 0
  mi.split = "train"             # the corpus mined (paper 000 §3.2.2: the training corpus)
  mi.num_neighbors = 16          # K negatives stored per example (training uses the first k)
  mi.search = "scann"            # scann | exact (chunked jnp top-k)
  mi.embed_batch_size = 64 if tiny else 256
  mi.recall_queries = 1000       # queries checked against exact search (recall in mine.json)
  mi.leaves_to_search_fraction = 0.05   # ScaNN rule, mining/scann_index.py; 0 below = derived
  mi.num_leaves = 0
  mi.num_leaves_to_search = 0
  mi.training_sample_size = 0
  mi.reorder = 0
  return c


def suggest_key(config: ml_collections.ConfigDict, dotted: str) -> str:
  """'Did you mean' text for a mistyped dotted key, from the config's own keys."""
  keys = list(_flat_keys(config))
  close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
  return f"did you mean --config.{close[0]}?" if close else "see the config file for valid keys"


def _flat_keys(config, prefix=""):
  for k, v in config.items():
    name = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_keys(v, name + ".")
    else:
      yield name


def _choice(value, key: str, options: tuple[str, ...]) -> None:
  if value not in options:
    raise ConfigError(f"--config.{key}={value!r} is not valid: use one of {', '.join(options)}")


def uses_teacher(config: ml_collections.ConfigDict, mode: str) -> bool:
  """Whether `mode` loads config.teacher: caching it, or a CPRD run scoring online."""
  if mode == "cache_teacher":
    return True
  return (config.method == "cprd" and config.cprd.distill != "none"
          and not config.cprd.bank_dir)


def validate(config: ml_collections.ConfigDict, num_devices: int, mode: str = "train") -> None:
  """Checks a config for `--mode=mode` against the device count before anything is compiled."""
  b = config.batch_size
  if b <= 0:
    raise ConfigError(f"--config.batch_size={b} must be positive")
  if b % num_devices:
    raise ConfigError(
        f"--config.batch_size={b} is not divisible by the {num_devices} devices of the mesh: "
        f"use a multiple of {num_devices} (e.g. --config.batch_size={max(num_devices, b - b % num_devices)})")
  gs = config.data.group_size
  if gs < 1 or b % gs:
    raise ConfigError(f"--config.batch_size={b} must be a multiple of --config.data.group_size={gs} "
                      "(batches are made of whole look-alike groups); change one of them")
  if config.model.image_size % config.model.patch_size:
    raise ConfigError(f"--config.model.patch_size={config.model.patch_size} must divide "
                      f"--config.model.image_size={config.model.image_size}")
  for key in ("num_steps", "log_every", "checkpoint_every"):
    if config.train[key] <= 0:
      raise ConfigError(f"--config.train.{key}={config.train[key]} must be positive")
  fm = config.data.fashion_mnist_dir
  if fm and not os.path.isdir(fm):
    raise ConfigError(
        f"--config.data.fashion_mnist_dir={fm!r} is not a directory: point it at a directory "
        "holding the four Fashion-MNIST IDX files, or leave it empty to use Debian's "
        "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
  if "teacher" in config and uses_teacher(config, mode):
    _validate_teacher(config)
  if "export" in config:
    _choice(config.export.quantization, "export.quantization", EXPORT_QUANTIZATIONS)
    _choice(config.export.parity_split, "export.parity_split", ("val", "test"))
    if config.export.image_batch_size < 1:
      raise ConfigError(f"--config.export.image_batch_size={config.export.image_batch_size} must "
                        "be at least 1 (1 for a phone, e.g. 32 for indexing)")
  if "mining" in config:
    _validate_mining(config)
  if config.method == "loopitr":
    _validate_loopitr(config)
  if config.method == "cprd":
    from jaxdistill.methods.cprd import validate as validate_cprd   # its choices live with the recipe
    validate_cprd(config)


def _validate_mining(config) -> None:
  mi = config.mining
  _choice(mi.search, "mining.search", ("scann", "exact"))
  _choice(mi.split, "mining.split", ("train", "val", "test"))
  if mi.num_neighbors < 1 or mi.embed_batch_size < 1 or mi.recall_queries < 0:
    raise ConfigError(f"--config.mining.num_neighbors={mi.num_neighbors}, embed_batch_size="
                      f"{mi.embed_batch_size} must be positive and recall_queries >= 0")
  if not 0.0 < mi.leaves_to_search_fraction <= 1.0:
    raise ConfigError(f"--config.mining.leaves_to_search_fraction={mi.leaves_to_search_fraction} "
                      "must lie in (0, 1]")
  section = config.get(config.method, None)
  k = section.get("hard_negatives", 0) if section is not None else 0
  if k > 0 and not mi.bank_dir:
    raise ConfigError(f"--config.{config.method}.hard_negatives={k} needs --config.mining.bank_dir: "
                      "mine a bank first (--mode=mine, docs/mining.md) and point it there")
  if k > mi.num_neighbors:
    raise ConfigError(f"--config.{config.method}.hard_negatives={k} exceeds --config.mining."
                      f"num_neighbors={mi.num_neighbors}: lower it or re-mine with more neighbours")


def _validate_teacher(config) -> None:
  te = config.teacher
  _choice(te.kind, "teacher.kind", ("", "workdir", "pretrained", "lit"))
  _choice(te.dtype, "teacher.dtype", ("float32", "bfloat16"))
  if te.kind and not te.path:
    raise ConfigError(f"--config.teacher.kind={te.kind} needs --config.teacher.path (the teacher's "
                      "workdir or checkpoint)")
  if te.kind and not os.path.exists(te.path):
    raise ConfigError(f"--config.teacher.path={te.path!r} does not exist: point it at the teacher's "
                      "workdir or checkpoint")
  if te.top_n < 1 or te.batch_size < 1:
    raise ConfigError(f"--config.teacher.top_n={te.top_n} and --config.teacher.batch_size="
                      f"{te.batch_size} must be positive")


def _validate_loopitr(config) -> None:
  lp, b = config.loopitr, config.batch_size
  m = lp.num_negatives
  if not 1 <= m < b:
    raise ConfigError(
        f"--config.loopitr.num_negatives={m} needs 1 <= m < batch_size={b}: the m hard negatives "
        f"are mined in-batch, so use at most --config.loopitr.num_negatives={b - 1} or a larger "
        "--config.batch_size")
  _choice(lp.negative_sampling, "loopitr.negative_sampling", ("hard", "random"))
  _choice(lp.itm_negatives, "loopitr.itm_negatives", ("hard", "random"))
  _choice(lp.distill_negatives, "loopitr.distill_negatives", ("image", "text", "both", "none"))
  _choice(lp.teacher, "loopitr.teacher", ("online", "momentum", "offline"))
  if lp.teacher == "offline" and not os.path.isdir(os.path.join(lp.offline_workdir or "/nonexistent", "checkpoints")):
    raise ConfigError(
        f"--config.loopitr.offline_workdir={lp.offline_workdir!r} holds no checkpoints/: with "
        "--config.loopitr.teacher=offline, point it at the --workdir of a finished LoopITR run")
  if lp.init_towers_from and not os.path.isdir(os.path.join(lp.init_towers_from, "checkpoints")):
    raise ConfigError(
        f"--config.loopitr.init_towers_from={lp.init_towers_from!r} holds no checkpoints/: point it "
        "at the --workdir of a finished dual-encoder run (configs/dual.py, configs/teacher.py:dual)")
  if not 0.0 < lp.mlm_probability < 1.0:
    raise ConfigError(f"--config.loopitr.mlm_probability={lp.mlm_probability} must be in (0, 1)")
