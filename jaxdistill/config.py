"""Shared config defaults (data, model, optimiser, loop, evaluation) and config validation.

Recipe configs in `configs/` start from `base_config(preset)` and add their own section.
Presets: "tiny" (seconds, for tests), "cpu" (the default: ~15 minutes on a 2-core CPU),
"paper" (paper 003 §4.1 sizes and optimiser values).

`validate(config, num_devices)` runs before anything is compiled and raises `ConfigError`
with one message naming the key and the fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any

import ml_collections
from jaxdistill.errors import JaxDistillError

PRESETS = ("tiny", "cpu", "paper")
# config.data.name: the bundled benchmark, then data/real/dataset.py NAMES.
DATA_NAMES = ("fashion_grid", "karpathy_json", "coco", "flickr30k", "tfds", "webdataset")
EXPORT_QUANTIZATIONS = ("none", "float16", "int8", "int8_full")   # export/tflite.py
MODEL_DTYPES = ("float32", "bfloat16")          # config.model.dtype: the student's compute dtype
REMAT_POLICIES = ("none", "full", "dots")       # config.model.remat (models/layers.remat_block)
RERANK_SCORES = ("cross", "cross+dual")         # config.eval.rerank_score (evaluate/rerank.py)


class ConfigError(JaxDistillError, ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def _model(preset: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.image_size = 56           # image_size, channels, image_mean / image_std: the benchmark's;
  m.channels = 1              # real data fills them in from config.data (data/real/dataset.py)
  m.patch_size = 28           # one token per 28x28 cell of the 2x2 grid
  m.stem = "conv"
  m.image_pool = "concat"     # per-cell slots in the image embedding (see docs/results.md)
  m.temperature_init = 0.07   # paper 003 eq. 2 / ALBEF
  m.dropout_rate = 0.0
  m.vocab_size = 256          # filled in from the built tokenizer
  m.max_len = 32
  m.image_tower = "vit"       # vit | efficientnet_lite0 | hf_vit (models/towers.py)
  m.text_tower = "transformer"   # transformer (models/text.py) | bert (HF BertModel: MiniLM, BERT)
  m.text_pool = "cls"         # text embedding: cls (token 0) | mean (over real tokens, MiniLM's)
  m.itm_pool = "cls"          # what a cross encoder's ITM head reads: cls | mean (fused tokens)
  m.cross_init_std = 0.0      # bert cross encoder's new cross-attention: 0 = LeCun, >0 = N(0, std)
  m.cross_gate = False        # bert cross encoder: tanh gate (starting at 0) on cross-attention
  m.cross_image_positions = 0.0   # >0: learnt position embedding on the image tokens a cross
                                  # encoder reads, N(0, value) (models/loopitr.py); 0 = none
  m.efficientnet_input_size = 128   # efficientnet_lite0: side the image is resized to (32 x cells)
  m.image_mean, m.image_std = 0.2628, 0.3470   # data/compositional.py's pixel normalisation
  # hf_vit (a HF ViT / BEiT / data2vec-vision encoder; pretrained/tower_configs.hf_vit fills these
  # from its config.json; widths: vision_width / layers / heads / mlp): the checkpoint's input
  # side, channels and per-channel normalisation of [0, 1] pixels (the image is adapted to them),
  # patch side, query/key/value biases, layer-scale init (0 = none), absolute positions, relative
  # position bias (none | per_layer | shared), activation, LayerNorm epsilon, final LayerNorm.
  m.hf_vit_image_size, m.hf_vit_channels, m.hf_vit_patch_size = 224, 3, 16
  m.hf_vit_image_mean, m.hf_vit_image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
  m.hf_vit_qkv_bias = (True, True, True)
  m.hf_vit_layer_scale = 0.0
  m.hf_vit_absolute_positions = True
  m.hf_vit_relative_positions = "none"
  m.hf_vit_activation = "gelu"
  m.hf_vit_layer_norm_eps = 1e-12
  m.hf_vit_final_norm = True
  m.bert_max_positions = 512  # bert: position-embedding rows (>= max_len)
  m.bert_type_vocab_size = 2  # bert: token-type rows (0 = none)
  m.bert_layer_norm_eps = 1e-12   # bert: LayerNorm epsilon (HF layer_norm_eps)
  m.bert_hidden_act = "gelu"  # bert: HF hidden_act (models/bert.py ACTIVATIONS)
  # Memory levers (docs/architecture.md "Memory levers"): the student's computation dtype
  # (float32 | bfloat16; params, gradients and optimiser state stay float32, embeddings, logits
  # and losses are float32) and the rematerialisation of each transformer block of its towers
  # (none | full: recompute the block in the backward pass | dots: keep its weight matmuls).
  m.dtype = "float32"
  m.remat = "none"
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


def clip_vit_b16_towers(model: ml_collections.ConfigDict) -> None:
  """config.model -> CLIP ViT-B/16's towers, trained from scratch: 224 px RGB, 16 px patches (a
  linear stem), 12 x 768 vision layers, [CLS] pooled; a 12 x 512 text tower over 77 tokens of
  CLIP's 49,408 ids; embed_dim 512 (~150M params). The ViT-B/16-sized student of
  benchmarks/memory_levers.py, throughput.py and configs/clip_distill.py."""
  m = model
  m.image_size, m.channels, m.patch_size, m.stem, m.image_pool = 224, 3, 16, "linear", "cls"
  m.vision_width, m.vision_layers, m.vision_heads, m.vision_mlp = 768, 12, 12, 3072
  m.text_width, m.text_layers, m.text_heads, m.text_mlp = 512, 12, 8, 2048
  m.vocab_size, m.max_len, m.embed_dim = 49408, 77, 512


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
  # fashion_grid: the bundled benchmark (the keys down to `tokenizer`); karpathy_json | coco |
  # flickr30k | tfds | webdataset: real data (data/real/dataset.py; README "Your own data").
  d.name = "fashion_grid"
  d.train_split = ""             # "" = the dataset's (train; Karpathy COCO: train+restval)
  d.fashion_mnist_dir = ""       # "" = search /usr/share/datasets/fashion-mnist
  d.seed = 0                     # benchmark generator seed (splits, captions, groups)
  d.num_train = 256 if tiny else 8000
  d.num_val = 32 if tiny else 500
  d.num_test = 64 if tiny else 1000
  d.group_size = 4               # batches of position-only look-alike / swap groups
  d.swap_fraction = 0.5
  d.vocab_size = 256
  d.tokenizer = ""               # "" = built from the captions; else tokenizer.json or HF dir
  # Real data only:
  d.karpathy_json = ""           # karpathy_json | coco | flickr30k: dataset_*.json ...
  d.image_root = ""              # ... and the folder its filepath / filename are relative to
  d.tfds_name = "coco_captions"  # tfds: the builder, prepared as ArrayRecord under tfds_dir
  d.tfds_dir = ""                # "" = ~/tensorflow_datasets
  d.shards = ml_collections.ConfigDict(dict(train="", val="", test=""))   # webdataset patterns
  d.unpaired_images = ""         # train_split=unpaired (paper 000 stage 1): image folder | shards
  d.unpaired_texts = ""          # ... and a text file (one caption per line) | shards
  d.max_captions = 5             # captions kept per image (the 5-per-image Karpathy protocol)
  d.image_size = 224             # side the student sees (train crop and eval centre crop)
  d.image_resize = 224           # eval: shorter side before the centre crop (0: straight resize)
  d.image_mean = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's constants
  d.image_std = (0.26862954, 0.26130258, 0.27577711)
  d.preprocessor = ""            # a checkpoint dir: its preprocessor_config.json replaces the 4 above
  d.crop_scale = (0.9, 1.0)      # RandomResizedCrop area fraction (open_clip fine-tuning)
  d.num_threads = 4              # host threads decoding images

  c.model = _model(preset)
  c.model.kind = "dual"          # models/build.py: dual | loopitr (set by the recipe's config)

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
  # Microbatches per step, gradients accumulated through an embedding cache (train/accumulate.py,
  # GradCache): the loss and gradients of the whole batch_size, at one microbatch's activation
  # memory. 1 = off; > 1 only for recipes whose loss reads embeddings (methods/<recipe>.py
  # ACCUMULATES).
  t.accum_steps = 1

  e = c.eval = ml_collections.ConfigDict()
  e.split = "test"
  e.batch_size = 64 if tiny else 250
  e.rerank_k = 16                # paper 003 Table 13: re-rank the dual encoder's top-k
  e.rerank_score = "cross"       # cross | cross+dual (ALBEF's evaluation: ITM logit + ITC
                                 # similarity; evaluate/rerank.py)
  e.pair_batch_size = 256 if tiny else 1024
  e.block_elements = 1 << 22     # scores per query block of the metrics (bounds eval memory)
  e.ann = False                  # also rank with ScaNN indexes (evaluate/ann.py): "dual (scann)"

  x = c.export = ml_collections.ConfigDict()   # --mode=export: TFLite towers (export/)
  x.quantization = "none"        # none | float16 | int8 (dynamic range: int8 weights, float math)
                                 # | int8_full (full integer: int8 weights and activations)
  x.parity_split = "test"        # held-out split for the TFLite-vs-JAX parity check
  x.image_batch_size = 1         # static batch of image_encoder.tflite (1: phone; more: indexing)
  x.representative_size = 200    # int8_full: train images (one caption each) scales calibrate on

  # Named frozen teachers (teachers/): recipes add the sections they read (teacher_section).
  c.teachers = ml_collections.ConfigDict()
  tc = c.teacher_cache = ml_collections.ConfigDict()   # --mode=cache_teacher (teachers/cache.py)
  tc.teacher = ""                # the config.teachers section cached
  tc.dir = ""                    # output; "" = <workdir>/teacher_cache
  tc.splits = "train"            # comma-separated splits to cache
  tc.top_n = 16                  # cross teacher: scores of each example's top-N (paper 002 §3.2.2)
  tc.batch_size = 64 if tiny else 256

  # --- the training contract, as data (train/optim.py, train/init.py, parallel/sharding.py) ---
  # (regex over param paths "module/sub/leaf", None = frozen | {config.optim overrides}); first
  # match wins, e.g. (("student/dual/image_encoder/.*", None), (".*", {})).
  c.trainable = ((".*", {}),)
  # Sources applied over the random init (unless resuming), see train/init.py: each
  # {"source": "workdir:PATH" | "pretrained:PATH", "architecture": "", "layers": "",
  #  "mapping": ((destination regex, source prefix), ...)}.
  c.init_from = ()
  sh = c.sharding = ml_collections.ConfigDict()
  # (regex over "params|ema|opt_state|extra|step|rng/...", "batch/<field>", "frozen/<name>/...",
  #  spec): spec "replicated" | "fsdp" (largest divisible dim over mesh.fsdp, leaves of at least
  #  min_fsdp_size elements) | "batch" (leading dim over data and fsdp) | an explicit tuple.
  #  Queues (extra) stay replicated: parallel/queue.py enqueues the globally gathered keys.
  sh.rules = (("batch/.*", "batch"), ("extra/.*", "replicated"), (".*", "fsdp"))
  sh.min_fsdp_size = 2 ** 14

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


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of "PATH[:preset]" (a file with get_config(preset)), as --config= loads it; for
  configs that build on another (configs/teacher.py) and for tests, with no sys.path edits."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist: give --config=configs/<recipe>.py")
  name = "_jaxdistill_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def suggest_key(config: ml_collections.ConfigDict, dotted: str) -> str:
  """'Did you mean' text for a mistyped dotted key, from the config's own keys."""
  keys = list(_flat_keys(config))
  close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
  return f"did you mean --config.{close[0]}?" if close else "see the config file for valid keys"


def flat_dict(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} of a nested dict (a config as JSON): the dotted keys its settings differ by."""
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in flat_dict(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


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


def teacher_section(kind: str = "", path: str = "") -> ml_collections.ConfigDict:
  """One named teacher: kind "" (none) | workdir | pretrained | cache, path (a run's workdir, a
  checkpoint, or a --mode=cache_teacher split directory: features read, not computed), dtype float32 | bfloat16 (params and compute; outputs float32), shard (params
  split over the mesh's fsdp axis by config.sharding.rules; False = replicated)."""
  return ml_collections.ConfigDict(dict(kind=kind, path=path, dtype="float32", shard=False))


TEACHER_KINDS = ("workdir", "pretrained", "cache")   # teachers/__init__.py KINDS


def validate_teachers(config: ml_collections.ConfigDict, names) -> None:
  """Checks the config.teachers sections `names` (those a mode or recipe reads)."""
  for name in names:
    if name not in config.teachers:
      raise ConfigError(f"--config.teachers.{name} is missing: this recipe reads a teacher named "
                        f"{name!r}; add the section (jaxdistill/config.py teacher_section)")
    te, key = config.teachers[name], f"--config.teachers.{name}"
    _choice(te.kind, f"teachers.{name}.kind", TEACHER_KINDS)
    _choice(te.dtype, f"teachers.{name}.dtype", MODEL_DTYPES)
    if not te.path:
      raise ConfigError(f"{key}.kind={te.kind} needs {key}.path (the teacher's workdir or "
                        "checkpoint)")
    if not os.path.exists(te.path):
      raise ConfigError(f"{key}.path={te.path!r} does not exist: point it at the teacher's "
                        "workdir or checkpoint")


def sharding_rules(config: ml_collections.ConfigDict) -> tuple:
  """config.sharding.rules, preceded by a "replicated" rule for each teacher with shard=False."""
  keep = tuple((f"frozen/{name}/.*", "replicated") for name, t in config.teachers.items()
               if not t.shard)
  return keep + tuple(tuple(rule) for rule in config.sharding.rules)


def _validate_accumulation(config, num_devices: int) -> None:
  """config.train.accum_steps: >= 1, and the microbatches batch_size / accum_steps a multiple of
  the devices (each microbatch is sharded over all). Whether the recipe can accumulate at all is
  methods/__init__.py's check."""
  accum, b = config.train.get("accum_steps", 1), config.batch_size
  if not isinstance(accum, int) or accum < 1:
    raise ConfigError(f"--config.train.accum_steps={accum!r} must be a positive integer "
                      "(1 = no gradient accumulation)")
  if accum == 1:
    return
  if b % (accum * num_devices):
    fits = [d for d in range(1, b // num_devices + 1) if b % (d * num_devices) == 0]
    raise ConfigError(f"--config.train.accum_steps={accum} must split --config.batch_size={b} into "
                      f"microbatches of a multiple of the {num_devices} devices: use one of "
                      f"{', '.join(map(str, fits))}, or change --config.batch_size")


def validate(config: ml_collections.ConfigDict, num_devices: int, mode: str = "train") -> None:
  """Checks a config for `--mode=mode` against the device count before anything is compiled."""
  _validate_mesh(config, num_devices)
  b = config.batch_size
  if b <= 0:
    raise ConfigError(f"--config.batch_size={b} must be positive")
  if b % num_devices:
    raise ConfigError(
        f"--config.batch_size={b} is not divisible by the {num_devices} devices of the mesh: "
        f"use a multiple of {num_devices} (e.g. --config.batch_size={max(num_devices, b - b % num_devices)})")
  name = config.data.get("name", "fashion_grid")
  _choice(name, "data.name", DATA_NAMES)
  gs = config.data.group_size
  if name == "fashion_grid" and (gs < 1 or b % gs):
    raise ConfigError(f"--config.batch_size={b} must be a multiple of --config.data.group_size={gs} "
                      "(batches are made of whole look-alike groups); change one of them")
  _choice(config.model.get("dtype", "float32"), "model.dtype", MODEL_DTYPES)
  _choice(config.model.get("remat", "none"), "model.remat", REMAT_POLICIES)
  if config.model.get("image_tower", "vit") == "hf_vit":
    _validate_hf_vit(config.model)
  if config.model.image_size % config.model.patch_size:
    raise ConfigError(f"--config.model.patch_size={config.model.patch_size} must divide "
                      f"--config.model.image_size={config.model.image_size}")
  for key in ("num_steps", "log_every", "checkpoint_every"):
    if config.train[key] <= 0:
      raise ConfigError(f"--config.train.{key}={config.train[key]} must be positive")
  if mode in ("train", "pretrain_image"):
    _validate_accumulation(config, num_devices)
  if config.eval.get("block_elements", 1) < 1:
    raise ConfigError(f"--config.eval.block_elements={config.eval.block_elements} must be positive "
                      "(scores per query block of the retrieval metrics, e.g. 4194304)")
  _choice(config.eval.get("rerank_score", "cross"), "eval.rerank_score", RERANK_SCORES)
  fm = config.data.fashion_mnist_dir
  if fm and not os.path.isdir(fm):
    raise ConfigError(
        f"--config.data.fashion_mnist_dir={fm!r} is not a directory: point it at a directory "
        "holding the four Fashion-MNIST IDX files, or leave it empty to use Debian's "
        "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
  if mode == "cache_teacher":
    tc = config.teacher_cache
    if not tc.teacher:
      raise ConfigError("--mode=cache_teacher needs --config.teacher_cache.teacher: the name of "
                        f"the config.teachers section to cache (this config has {list(config.teachers)})")
    validate_teachers(config, [tc.teacher])
    if tc.top_n < 1 or tc.batch_size < 1:
      raise ConfigError(f"--config.teacher_cache.top_n={tc.top_n} and --config.teacher_cache."
                        f"batch_size={tc.batch_size} must be positive")
  if "export" in config:
    _choice(config.export.quantization, "export.quantization", EXPORT_QUANTIZATIONS)
    _choice(config.export.parity_split, "export.parity_split", ("val", "test"))
    if config.export.image_batch_size < 1:
      raise ConfigError(f"--config.export.image_batch_size={config.export.image_batch_size} must "
                        "be at least 1 (1 for a phone, e.g. 32 for indexing)")
    size = config.export.get("representative_size", 200)
    if size < config.export.image_batch_size:
      raise ConfigError(f"--config.export.representative_size={size} must be at least "
                        f"--config.export.image_batch_size={config.export.image_batch_size} (the "
                        "int8_full calibration runs whole image batches; 200 is the default)")
  if "mining" in config:
    _validate_mining(config)
  if mode == "train":
    _validate_init_from(config)


def _validate_hf_vit(m) -> None:
  """The hf_vit tower's fields (models/towers.py): a patch grid, one mean / std per channel."""
  _choice(m.hf_vit_relative_positions, "model.hf_vit_relative_positions",
          ("none", "per_layer", "shared"))
  if m.hf_vit_image_size % m.hf_vit_patch_size:
    raise ConfigError(f"--config.model.hf_vit_patch_size={m.hf_vit_patch_size} must divide "
                      f"--config.model.hf_vit_image_size={m.hf_vit_image_size} (the checkpoint's)")
  for key in ("hf_vit_image_mean", "hf_vit_image_std"):
    if len(m[key]) != m.hf_vit_channels:
      raise ConfigError(f"--config.model.{key}={tuple(m[key])} needs one value per channel "
                        f"(--config.model.hf_vit_channels={m.hf_vit_channels})")
  if len(m.hf_vit_qkv_bias) != 3:
    raise ConfigError(f"--config.model.hf_vit_qkv_bias={tuple(m.hf_vit_qkv_bias)} needs three "
                      "booleans (query, key, value)")


def _validate_mesh(config, n: int) -> None:
  data, fsdp = config.mesh.data, config.mesh.fsdp
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"--config.mesh.fsdp={fsdp} must divide the {n} devices: use one of {divisors}")
  if data != -1 and data * fsdp != n:
    raise ConfigError(f"--config.mesh.data * --config.mesh.fsdp = {data} * {fsdp} must equal the "
                      f"{n} devices: set --config.mesh.data={n // fsdp} (or -1: all devices left "
                      "after fsdp)")


def _validate_init_from(config) -> None:
  """Each init_from source reads KIND:PATH with an existing PATH and has a mapping (the
  sources are read only when the run does not resume; train/init.py checks the rest)."""
  for i, entry in enumerate(config.init_from):
    key = f"--config.init_from[{i}]"
    source = entry.get("source", "") if hasattr(entry, "get") else ""
    kind, sep, path = source.partition(":")
    if not sep or kind not in ("workdir", "pretrained") or not path:
      raise ConfigError(f"{key} source {source!r} must read workdir:PATH (an earlier run) or "
                        "pretrained:PATH (a local checkpoint directory)")
    if not os.path.exists(path):
      raise ConfigError(f"{key} source {source!r}: {path} does not exist; train that stage first "
                        "or fix the path")
    if not entry.get("mapping"):
      raise ConfigError(f"{key} has no mapping: give ((destination regex, source prefix), ...), "
                        "e.g. (('student/', 'student/'),)")


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
