"""The self-supervised image backbone (docs/ssl_vit.md): the on-device grid generator and its
per-cell augmentations, the image-only network (model.kind "image"), and end to end on the tiny
preset: DINO pretraining that checkpoints, resumes as an uninterrupted run, loads through
load_run and as a workdir teacher, and whose first-N-layer truncation (init_from) equals the
full network's output after layer N followed by its final LayerNorm."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import logged_losses, recipe_config
from jaxdistill import methods
from jaxdistill.config import ConfigError
from jaxdistill.data.compositional import GRID_SIZE, normalize_images
from jaxdistill.data.fashion_mnist import IMAGE_SIZE
from jaxdistill.data.ssl_grids import (EMPTY_RATE, Augmentation, augment_view, probe_grids,
                                       sample_grids, split_cells)
from jaxdistill.models.build import build_model, init_params, towers
from jaxdistill.models.image import ImageNetwork, ImageOnlyError

OFF = Augmentation(max_shift=0, flip_prob=0.0, gain=0.0, erase_prob=0.0, noise_std=0.0)


def _items(n=50, seed=0):
  """n distinct random uint8 'items' [n, 28, 28] with no all-zero item."""
  rng = np.random.default_rng(seed)
  return rng.integers(1, 256, (n, IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8)


# --- grids -----------------------------------------------------------------------------------------

def test_grid_cells_hold_the_drawn_items_or_nothing():
  items = _items()
  grids, sources = jax.device_get(sample_grids(jax.random.PRNGKey(0), jnp.asarray(items), 64))
  assert grids.shape == (64, GRID_SIZE, GRID_SIZE) and grids.dtype == np.uint8
  assert sources.shape == (64, 4) and sources.min() >= -1 and sources.max() < len(items)
  cells = np.asarray(split_cells(grids))
  for b in range(64):
    assert (sources[b] >= 0).any()
    for c in range(4):
      expected = items[sources[b, c]] if sources[b, c] >= 0 else np.zeros_like(items[0])
      np.testing.assert_array_equal(cells[b, c], expected)
  # Cell order is the benchmark's: TL, TR, BL, BR.
  np.testing.assert_array_equal(cells[:, 1], grids[:, :IMAGE_SIZE, IMAGE_SIZE:])
  np.testing.assert_array_equal(cells[:, 2], grids[:, IMAGE_SIZE:, :IMAGE_SIZE])


def test_grids_are_a_function_of_the_key():
  items = jnp.asarray(_items())
  a = sample_grids(jax.random.PRNGKey(3), items, 16)
  b = sample_grids(jax.random.PRNGKey(3), items, 16)
  c = sample_grids(jax.random.PRNGKey(4), items, 16)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


def test_empty_cell_rate_and_uniform_items():
  items = jnp.asarray(_items(n=10))
  _, sources = jax.device_get(sample_grids(jax.random.PRNGKey(1), items, 20_000))
  rate = float((sources == -1).mean())
  assert abs(rate - EMPTY_RATE) < 0.005, rate     # 80,000 cells: std 0.001
  counts = np.bincount(sources[sources >= 0], minlength=10) / (sources >= 0).sum()
  np.testing.assert_allclose(counts, 0.1, atol=0.01)
  # No grid is left empty, even when nearly every cell is drawn empty.
  _, sources = jax.device_get(sample_grids(jax.random.PRNGKey(2), items, 2000, empty_rate=0.95))
  assert ((sources >= 0).sum(axis=1) >= 1).all()


# --- augmentations -----------------------------------------------------------------------------------

def _one_item_grids(n=8):
  items = _items(n, seed=1)
  grids = np.zeros((n, GRID_SIZE, GRID_SIZE), np.uint8)
  grids[:, :IMAGE_SIZE, :IMAGE_SIZE] = items
  return grids


def test_no_augmentation_is_the_benchmark_normalisation():
  grids = _one_item_grids()
  view = augment_view(jax.random.PRNGKey(0), jnp.asarray(grids), OFF)
  np.testing.assert_allclose(view, normalize_images(grids), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(probe_grids(grids[:, :IMAGE_SIZE, :IMAGE_SIZE]),
                                normalize_images(grids))


def test_augmentations_never_move_content_to_another_cell():
  grids = _one_item_grids(32)
  strong = Augmentation(max_shift=5, zoom=0.3, blur_prob=0.5, blur_sigma=2.0, solarize_prob=0.5,
                        flip_prob=0.5, gain=0.5, erase_prob=1.0, noise_std=0.0)
  background = normalize_images(np.zeros((1, GRID_SIZE, GRID_SIZE), np.uint8))[0, 0, 0, 0]
  for seed in range(3):
    view = np.asarray(augment_view(jax.random.PRNGKey(seed), jnp.asarray(grids), strong))
    assert view.shape == (32, GRID_SIZE, GRID_SIZE, 1) and view.dtype == np.float32
    cells = np.asarray(split_cells(view[..., 0]))
    np.testing.assert_allclose(cells[:, 1:], background, rtol=0, atol=1e-6)   # still empty
    assert (cells[:, 0] != background).any(axis=(1, 2)).all()  # the item is still there
    assert not np.allclose(view, normalize_images(grids))


def test_flip_and_shift_act_inside_each_cell():
  grids = _one_item_grids(4)
  flipped = augment_view(jax.random.PRNGKey(0), jnp.asarray(grids),
                         Augmentation(max_shift=0, flip_prob=1.0, gain=0.0, erase_prob=0.0,
                                      noise_std=0.0))
  expected = grids.copy()
  expected[:, :IMAGE_SIZE, :IMAGE_SIZE] = grids[:, :IMAGE_SIZE, :IMAGE_SIZE][:, :, ::-1]
  np.testing.assert_allclose(flipped, normalize_images(expected), rtol=1e-6, atol=1e-6)
  shifted = np.asarray(augment_view(jax.random.PRNGKey(1), jnp.asarray(grids),
                                    Augmentation(max_shift=2, flip_prob=0.0, gain=0.0,
                                                 erase_prob=0.0, noise_std=0.0)))
  pixels = np.rint((shifted[..., 0] * 0.3470 + 0.2628) * 255).astype(np.int64)
  for b in range(4):   # some shift (dy, dx) in [-2, 2]^2 reproduces the cell, zeros moved in
    cell = grids[b, :IMAGE_SIZE, :IMAGE_SIZE].astype(np.int64)
    padded = np.pad(cell, 2)
    assert any(np.array_equal(pixels[b, :IMAGE_SIZE, :IMAGE_SIZE],
                              padded[2 - dy:2 - dy + IMAGE_SIZE, 2 - dx:2 - dx + IMAGE_SIZE])
               for dy in range(-2, 3) for dx in range(-2, 3))
    assert (pixels[b, IMAGE_SIZE:] == 0).all() and (pixels[b, :, IMAGE_SIZE:] == 0).all()


# --- the image-only network ---------------------------------------------------------------------------

def test_image_network_encodes_a_normalised_cls_and_has_no_text_side():
  config = recipe_config("ssl_vit")
  model = build_model(config.model)
  assert isinstance(model, ImageNetwork)
  params = jax.jit(lambda key: init_params(model, config.model, key))(jax.random.PRNGKey(0))
  assert set(params) == {"image_encoder"}
  t = towers(model)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 56, 56, 1)), jnp.float32)
  emb, tokens = jax.jit(t.embed_image)(params, images)
  assert emb.shape == (3, 32) and emb.dtype == jnp.float32 and tokens.shape == (3, 5, 32)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(emb, tokens[:, 0] / jnp.linalg.norm(tokens[:, 0], axis=-1,
                                                                 keepdims=True), rtol=1e-5)
  with pytest.raises(ImageOnlyError, match="embed_text: this network is image-only"):
    t.embed_text(params, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ImageOnlyError, match="temperature: this network is image-only"):
    t.temperature(params)
  assert t.match_scores is None and t.match_outputs is None


def test_dino_config_is_trained_only_by_pretrain_image(tmp_path):
  config = recipe_config("ssl_vit")
  with pytest.raises(ConfigError, match="run it with --mode=pretrain_image"):
    methods.validate(config)
  with pytest.raises(ConfigError, match="no image pretraining recipe"):
    methods.pretrain_image(recipe_config("dual"), str(tmp_path))
  config.model.kind = "dual"
  with pytest.raises(ConfigError, match="model.kind='dual'.*set --config.model.kind=image"):
    methods.pretrain_image(config, str(tmp_path))
  config = recipe_config("ssl_vit")
  config.dino.augment_max_shift = 14
  with pytest.raises(ConfigError, match="augment_max_shift=14"):
    methods.pretrain_image(config, str(tmp_path))
  assert not os.listdir(tmp_path)   # nothing was written


# --- end to end (tiny preset) -------------------------------------------------------------------

def _tiny(num_steps=6):
  config = recipe_config("ssl_vit")
  config.train.num_steps = num_steps
  config.probe.num_train, config.probe.num_test, config.probe.steps = 64, 64, 5
  return config


def _restore_params(workdir, step):
  from jaxdistill.store.checkpoint import Checkpointer
  checkpointer = Checkpointer(str(workdir))
  raw = checkpointer.restore_raw(step)
  checkpointer.close()
  return jax.tree.map(np.asarray, {"params": raw["params"], "ema": raw["ema"],
                                   "extra": raw["extra"]})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A finished tiny DINO run (6 steps, checkpoints at 4 and 6) and its step-6 state."""
  workdir = tmp_path_factory.mktemp("ssl_vit")
  report = methods.pretrain_image(_tiny(), str(workdir))
  return workdir, report, _restore_params(workdir, 6)


@pytest.mark.slow
def test_pretraining_writes_a_checkpoint_metrics_and_the_probe(pretrained):
  workdir, report, state = pretrained
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
  assert sorted(logged_losses(str(workdir))) == list(range(1, 7))
  assert report["step"] == 6 and os.path.isfile(workdir / "probe.json")
  assert report["provenance"]["checkpoint"] == str(workdir / "checkpoints" / "6")
  assert {"pixels", "student/cls", "student/cell", "ema_teacher/cls",
          "random_init/cls"} <= set(report["accuracy"])
  assert set(state["params"]) == {"student", "head"} and set(state["ema"]) == {"student", "head"}
  assert state["extra"]["center"].shape == (64,) and np.abs(state["extra"]["center"]).sum() > 0
  # The teacher is the EMA of the student, not the student.
  a = state["params"]["student"]["image_encoder"]["cls_embedding"]
  b = state["ema"]["student"]["image_encoder"]["cls_embedding"]
  assert not np.allclose(a, b)


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(pretrained, tmp_path, monkeypatch):
  from jaxdistill.train import pretrain
  workdir, _, final = pretrained
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")      # as if killed after the step-4 checkpoint
  monkeypatch.setattr(pretrain, "probe_run", lambda *args: {"accuracy": {}})   # tested above
  methods.pretrain_image(_tiny(), str(resumed))
  got = _restore_params(resumed, 6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got, final)
  expected, losses = logged_losses(str(workdir)), logged_losses(str(resumed))
  for step in (5, 6):
    assert losses[step] == pytest.approx(expected[step], rel=1e-5)


@pytest.mark.slow
def test_run_loads_as_a_network_and_as_an_image_teacher(pretrained):
  from jaxdistill.store.run import load_run
  from jaxdistill.teachers import load_teacher
  workdir, _, state = pretrained
  run = load_run(str(workdir))
  assert isinstance(run.model, ImageNetwork) and run.step == 6
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, run.params),
               state["params"]["student"])
  teacher = load_teacher({"kind": "workdir", "path": str(workdir), "dtype": "float32"})
  assert teacher.tokenize is None and teacher.temperature is None
  images = jnp.asarray(probe_grids(_items(4)))
  emb = teacher.embed_images(teacher.params, images)
  _, tokens = run.towers.embed_image(run.params, images)
  cls = np.asarray(tokens[:, 0])
  np.testing.assert_allclose(emb, cls / np.linalg.norm(cls, axis=-1, keepdims=True), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ImageOnlyError, match="no text tower"):
    teacher.embed_texts(teacher.params, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "dual"])
def test_first_layers_via_init_from_equal_the_full_network_cut_after_layer_n(pretrained, kind):
  """Truncation parity (issue 15): a 1-layer ViT started by init_from `first:1` from the 2-layer
  DINO run gives the full ViT's tokens after layer_0 followed by the source's ln_final."""
  from jaxdistill.train.init import apply_init_from
  workdir, _, state = pretrained
  full_config = recipe_config("ssl_vit")
  full = build_model(full_config.model)
  full_params = state["params"]["student"]
  images = jnp.asarray(probe_grids(_items(5, seed=2)))
  _, captured = full.apply({"params": full_params}, images, capture_intermediates=True,
                           mutable=["intermediates"])
  after_layer_0 = captured["intermediates"]["image_encoder"]["encoder"]["layer_0"]["__call__"][0]
  ln_final = full_params["image_encoder"]["encoder"]["ln_final"]
  expected = nn.LayerNorm().apply({"params": ln_final}, after_layer_0)

  config = recipe_config("dual") if kind == "dual" else recipe_config("ssl_vit")
  mc = config.model
  mc.image_tower, mc.patch_size, mc.stem = "vit", 28, "conv"
  mc.vision_width, mc.vision_layers = full_config.model.vision_width, 1
  mc.vision_heads, mc.vision_mlp = full_config.model.vision_heads, full_config.model.vision_mlp
  student = build_model(mc)
  params = {"student": jax.jit(lambda key: init_params(student, mc, key))(jax.random.PRNGKey(7))}
  params, log = apply_init_from(params, [{
      "source": f"workdir:{workdir}", "layers": "first:1",
      "mapping": (("student/image_encoder/", "student/image_encoder/"),)}])
  assert "init_from workdir:" in log[0]
  _, tokens = towers(student).embed_image(params["student"], images)
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(tokens, full.apply({"params": full_params}, images)[1], atol=1e-3)
