"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021)
on random Fashion-MNIST grids: the self-supervised image backbone of paper 004 (issue 15).

Modules: "student" (model.kind "image": the ViT of models/towers.py alone, models/image.py)
and "head" (DINOHead: 3-layer MLP -> bottleneck -> L2 -> weight-normalised linear to K
prototypes, models/dino_head.py); the teacher is their exponential moving average
(Recipe.ema, read as frozen["ema"]), with a constant momentum `dino.teacher_momentum` (DINO's
cosine schedule 0.996 -> 1 is replaced by a constant: our runs are a few hundred steps). The
centre C of the teacher's logits is the carry (TrainState.extra["center"]).

One step (Algorithm 1 with 2 global views, no multi-crop):
  grids = data/ssl_grids.sample_grids(key, 60,000 train images)   new grids every step
  x1, x2 = augment_view(k1, grids), augment_view(k2, grids)         per-cell augmentations
  s1, s2 = head(student(x1)[CLS]), head(student(x2)[CLS])
  t1, t2 = EMA head(EMA student(x)[CLS])                             no gradient
  loss = H(t1, s2) / 2 + H(t2, s1) / 2                               losses/dino.py
  C <- m C + (1 - m) mean(t1, t2)
The grids are generated on device from the step key, so `batch` is empty: the train images are
a frozen input ("items"), placed once. Trained with `--mode=pretrain_image` (train/pretrain.py:
the trainer's build_state / make_train_step / checkpoints, then a linear probe).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxdistill.config import ConfigError
from jaxdistill.data.fashion_mnist import load_fashion_mnist
from jaxdistill.data.ssl_grids import Augmentation, augment_view, sample_grids
from jaxdistill.losses.dino import dino_loss, update_center
from jaxdistill.methods.base import STUDENT, Module, Recipe, dropout_rngs, student_module
from jaxdistill.models.dino_head import DINOHead
from jaxdistill.models.image import ImageNetwork
from jaxdistill.models.towers import image_width
from jaxdistill.parallel.mesh import batch_sharding

HEAD = "head"
NUM_VIEWS = 2      # DINO's two global views (no multi-crop, docs/ssl_vit.md)
_GRID_STREAM, _VIEW_STREAM = 0x6D1, 0x71E   # folded into the step key


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the dino / model / probe key and the fix."""
  if config.get("method") != "dino" or "dino" not in config:
    raise ConfigError("--mode=pretrain_image needs a DINO config (config.method='dino' and a "
                      "`dino` section): use --config=configs/ssl_vit.py")
  if config.model.get("kind", "dual") != "image":
    raise ConfigError(f"--config.model.kind={config.model.get('kind', 'dual')!r}: DINO pretrains "
                      "an image-only network, set --config.model.kind=image")
  d = config.dino
  for key in ("head_hidden", "head_bottleneck", "num_prototypes"):
    if d[key] < 1:
      raise ConfigError(f"--config.dino.{key}={d[key]} must be positive")
  for key in ("student_temperature", "teacher_temperature"):
    if d[key] <= 0:
      raise ConfigError(f"--config.dino.{key}={d[key]} must be positive (paper: student 0.1, "
                        "teacher 0.04)")
  for key in ("teacher_momentum", "center_momentum"):
    if not 0.0 <= d[key] < 1.0:
      raise ConfigError(f"--config.dino.{key}={d[key]} must lie in [0, 1) (paper: teacher "
                        "0.996, centre 0.9)")
  if not 0.0 <= d.empty_rate < 1.0:
    raise ConfigError(f"--config.dino.empty_rate={d.empty_rate} must lie in [0, 1) (the "
                      "benchmark's: 1/11)")
  if d.augment_max_shift < 0 or d.augment_max_shift >= 14:
    raise ConfigError(f"--config.dino.augment_max_shift={d.augment_max_shift} must lie in [0, 14) "
                      "pixels (a shift stays inside its 28-pixel cell)")
  if not 1 <= d.augment_erase_min <= d.augment_erase_max <= 28:
    raise ConfigError(f"--config.dino.augment_erase_min={d.augment_erase_min} and augment_erase_max="
                      f"{d.augment_erase_max} must satisfy 1 <= min <= max <= 28 (the cell side)")
  for key in ("augment_flip", "augment_erase", "augment_blur", "augment_solarize"):
    if not 0.0 <= d[key] <= 1.0:
      raise ConfigError(f"--config.dino.{key}={d[key]} is a probability: use a value in [0, 1]")
  if d.augment_blur_sigma < 0.1:
    raise ConfigError(f"--config.dino.augment_blur_sigma={d.augment_blur_sigma} must be >= 0.1 "
                      "(the blur's sigma is drawn from [0.1, augment_blur_sigma] pixels)")
  if not 0.0 <= d.augment_zoom < 1.0:
    raise ConfigError(f"--config.dino.augment_zoom={d.augment_zoom} must lie in [0, 1) (scale "
                      "factors 1 +- zoom)")
  if not 0.0 <= d.augment_gain < 1.0 or d.augment_noise < 0:
    raise ConfigError(f"--config.dino.augment_gain={d.augment_gain} must lie in [0, 1) and "
                      f"augment_noise={d.augment_noise} must be >= 0")
  p = config.probe
  if not (1 <= p.num_train <= 60_000 and 1 <= p.num_test <= 10_000 and p.steps >= 1
          and p.batch_size >= 1):
    raise ConfigError(f"--config.probe: num_train={p.num_train} (1..60000), num_test="
                      f"{p.num_test} (1..10000), steps={p.steps} and batch_size={p.batch_size} "
                      "(>= 1) are out of range")


def augmentation(config: ml_collections.ConfigDict) -> Augmentation:
  """The per-cell augmentation of config.dino's augment_* fields (data/ssl_grids.py)."""
  d = config.dino
  return Augmentation(max_shift=d.augment_max_shift, zoom=d.augment_zoom,
                      blur_prob=d.augment_blur, blur_sigma=d.augment_blur_sigma,
                      solarize_prob=d.augment_solarize,
                      flip_prob=d.augment_flip, gain=d.augment_gain, erase_prob=d.augment_erase,
                      erase_min=d.augment_erase_min, erase_max=d.augment_erase_max,
                      noise_std=d.augment_noise)


def head_module(config: ml_collections.ConfigDict) -> Module:
  """The "head" module: DINOHead over the tower's [CLS] width."""
  d = config.dino
  head = DINOHead(d.head_hidden, d.head_bottleneck, d.num_prototypes)
  width = image_width(config.model)
  return Module(head, lambda key: head.init(key, jnp.zeros((1, width), jnp.float32))["params"])


def make_loss_fn(config: ml_collections.ConfigDict, network: ImageNetwork, head: DINOHead,
                 mesh: Mesh | None):
  """The contract loss (params, frozen, extra, batch, rng, step) -> (loss, metrics, extra);
  frozen = {"items": uint8 [N, 28, 28], "ema": {"student", "head"}}; batch is unused."""
  d, batch_size, aug = config.dino, config.batch_size, augmentation(config)

  def prototypes(net_params, head_params, views, rngs):
    _, tokens = network.apply({"params": net_params}, views, deterministic=rngs is None,
                              rngs=rngs, method=ImageNetwork.encode_image)
    logits = head.apply({"params": head_params}, tokens[:, 0])
    return logits.reshape(NUM_VIEWS, batch_size, -1)                     # [V, B, K]

  def loss_fn(params, frozen, extra, batch, rng, step):
    del batch, step
    grids, _ = sample_grids(jax.random.fold_in(rng, _GRID_STREAM), frozen["items"], batch_size,
                            d.empty_rate)
    if mesh is not None:   # each device draws and augments its own rows
      grids = jax.lax.with_sharding_constraint(grids, batch_sharding(mesh))
    view_key = jax.random.fold_in(rng, _VIEW_STREAM)
    views = jnp.concatenate([augment_view(jax.random.fold_in(view_key, v), grids, aug)
                             for v in range(NUM_VIEWS)])                  # [V B, 56, 56, 1]
    student = prototypes(params[STUDENT], params[HEAD], views, dropout_rngs(config, rng, 0))
    ema = jax.lax.stop_gradient(frozen["ema"])
    teacher = prototypes(ema[STUDENT], ema[HEAD], views, None)
    loss, parts = dino_loss(student, teacher, extra["center"], d.student_temperature,
                            d.teacher_temperature)
    center = update_center(extra["center"], teacher, d.center_momentum)
    return loss, parts, {"center": center}

  return loss_fn


def build(config: ml_collections.ConfigDict, mesh: Mesh | None) -> Recipe:
  """The DINO recipe: modules "student" (image network) and "head", both with an EMA teacher;
  frozen = the 60,000 Fashion-MNIST train images; extra = the centre C [K] (zeros)."""
  validate(config)
  student = student_module(config)
  head = head_module(config)
  items = load_fashion_mnist(config.data.fashion_mnist_dir or None).train_images
  k = config.dino.num_prototypes
  momentum = config.dino.teacher_momentum
  return Recipe(
      name="dino",
      modules={STUDENT: student, HEAD: head},
      loss_fn=make_loss_fn(config, student.model, head.model, mesh),
      frozen={"items": items},
      ema={STUDENT: momentum, HEAD: momentum},
      init_extra=lambda: {"center": jnp.zeros((k,), jnp.float32)},
  )
