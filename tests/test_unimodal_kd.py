"""Paper 004's recipe (methods/unimodal_kd.py, configs/unimodal_kd.py): the shared layer, the
every-second-layer truncation against transformers, the whole objective L_cl + L_kd against a
numpy transcription, the memory bank's contents, and 8 simulated devices against 1."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import assert_devices_agree, loss_and_grads, one_device_mesh
from jaxdistill.config import load_config_file
from jaxdistill.data.tokenizer import encode, load_pretrained_tokenizer
from jaxdistill.methods import unimodal_kd
from jaxdistill.methods.base import STUDENT
from jaxdistill.models.build import build_model, init_params, towers
from jaxdistill.models.dual import l2_normalize
from jaxdistill.models.layers import Encoder
from jaxdistill.models.vit import ViT
from jaxdistill.parallel import queue as fq
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.pretrained.packaged import minilm_dir
from jaxdistill.teachers.base import make_teacher
from jaxdistill.train.init import apply_init_from

B, L, BANK, TEACHER_WIDTH = 16, 12, 24, 48


def _config(arg="tiny"):
  c = load_config_file(f"configs/unimodal_kd.py:{arg}")
  c.model.vocab_size = 30522
  c.model.max_len = L
  c.unimodal_kd.bank_size = BANK
  return c


def _teacher():
  """A random ViT whose normalised [CLS] is the frozen image teacher."""
  vit = ViT(28, TEACHER_WIDTH, 1, 2, 64, stem="conv")
  params = vit.init(jax.random.PRNGKey(7), jnp.zeros((1, 56, 56, 1)))["params"]
  return make_teacher("random_vit", params,
                      embed_images=lambda p, x: l2_normalize(vit.apply({"params": p}, x)[:, 0]))


def _batch(seed, image_ids):
  rng = np.random.default_rng(seed)
  mask = (np.arange(L)[None] < rng.integers(4, L + 1, (B, 1))).astype(np.int32)
  return {"image": rng.normal(size=(B, 56, 56, 1)).astype(np.float32),
          "text_ids": (rng.integers(1000, 3000, (B, L)) * mask).astype(np.int32),
          "text_mask": mask, "image_id": np.asarray(image_ids, np.int32)}


@pytest.fixture(scope="module")
def setup():
  """(config, model, head, teacher, params, bank) with a bank holding 10 earlier teacher features
  (ids 100..109 and two of the batch's own ids) and 14 empty slots."""
  config = _config()
  model = build_model(config.model)
  head = nn.Dense(TEACHER_WIDTH)
  params = {STUDENT: init_params(model, config.model, jax.random.PRNGKey(0)),
            unimodal_kd.KD_HEAD: head.init(jax.random.PRNGKey(1),
                                           jnp.zeros((1, config.model.text_width)))["params"]}
  teacher = _teacher()
  bank = fq.create_queue(BANK, {"teacher": jax.ShapeDtypeStruct((TEACHER_WIDTH,), jnp.float32)})
  keys = l2_normalize(jax.random.normal(jax.random.PRNGKey(3), (10, TEACHER_WIDTH)))
  bank = fq.enqueue(bank, {"teacher": keys}, jnp.asarray(list(range(100, 108)) + [3, 5]))
  return config, model, head, teacher, params, bank


def _loss(setup, mesh, batch, bank):
  config, model, head, teacher, params, _ = setup
  loss_fn = unimodal_kd.make_loss_fn(config, model, teacher, mesh)
  return loss_and_grads(loss_fn, mesh, params, batch, frozen={"ssl": teacher.params},
                        extra={"bank": bank})


# --- the student ---------------------------------------------------------------------------------

def test_one_shared_layer_runs_on_each_tower_and_respects_padding(setup):
  config, model, _, _, params, _ = setup
  p = params[STUDENT]
  assert "shared" in p and "image_projection" not in p and "text_projection" not in p
  t = towers(model)
  batch = _batch(0, range(B))
  shared = Encoder(1, config.model.shared_heads, config.model.shared_mlp)
  emb, tokens = t.embed_text(p, batch["text_ids"], batch["text_mask"])
  below = model.apply({"params": p}, batch["text_ids"], batch["text_mask"],
                      method=lambda m, i, k: m.text_encoder(i, k))
  by_hand = shared.apply({"params": p["shared"]}, below, batch["text_mask"])
  np.testing.assert_allclose(tokens, by_hand, atol=1e-5)
  np.testing.assert_allclose(emb, l2_normalize(by_hand[:, 0]), atol=1e-5)   # [CLS], no projection
  img, img_tokens = t.embed_image(p, batch["image"])
  below = model.apply({"params": p}, batch["image"], method=lambda m, x: m.image_encoder(x))
  np.testing.assert_allclose(img_tokens, shared.apply({"params": p["shared"]}, below), atol=1e-5)
  np.testing.assert_allclose(img, l2_normalize(img_tokens[:, 0]), atol=1e-6)
  # padding never changes a caption's embedding
  padded = np.where(batch["text_mask"] == 1, batch["text_ids"], 4242)
  np.testing.assert_allclose(t.embed_text(p, padded, batch["text_mask"])[0], emb, atol=1e-6)


def test_every_second_layer_truncation_equals_transformers(tmp_path):
  """configs/unimodal_kd.py:cpu,every_second: MiniLM's layers 0, 2, 4 through init_from equal a
  3-layer transformers BertModel holding those layers."""
  config = load_config_file("configs/unimodal_kd.py:tiny,every_second")
  config.init_from = tuple(e for e in config.init_from if e["source"].startswith("pretrained:"))
  assert config.init_from[0]["layers"] == "0,2,4" and config.model.text_layers == 3
  model = build_model(config.model)
  params = {STUDENT: jax.device_get(init_params(model, config.model, jax.random.PRNGKey(0)))}
  params, log = apply_init_from(params, config.init_from)
  sentences = ["a sandal top left, a bag below it", "two t-shirts on top", "a coat"]
  ids, mask = encode(load_pretrained_tokenizer(minilm_dir()), sentences, config.model.max_len)
  got = np.asarray(model.apply({"params": params[STUDENT]}, ids, mask,
                               method=lambda m, i, k: m.text_encoder(i, k)))
  full = transformers.BertModel.from_pretrained(minilm_dir()).eval()
  full.encoder.layer = torch.nn.ModuleList([full.encoder.layer[i] for i in (0, 2, 4)])
  full.config.num_hidden_layers = 3
  with torch.no_grad():
    want = full(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=2e-4)


# --- the objective -------------------------------------------------------------------------------

def _log_softmax_rows(x):
  m = x.max(1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def _numpy_objective(setup, batch, bank):
  """L_cl + L_kd written out from the towers' outputs (paper 004 §3.3-3.4), float64."""
  config, model, head, teacher, params, _ = setup
  t = towers(model)
  p = params[STUDENT]
  img, img_tokens = [np.asarray(a, np.float64) for a in t.embed_image(p, batch["image"])]
  txt, txt_tokens = [np.asarray(a, np.float64) for a in
                     t.embed_text(p, batch["text_ids"], batch["text_mask"])]
  tau = float(t.temperature(p))
  s = img @ txt.T / tau
  l_cl = -np.mean(np.diag(_log_softmax_rows(s))) - np.mean(np.diag(_log_softmax_rows(s.T)))
  w = {k: np.asarray(v, np.float64) for k, v in params[unimodal_kd.KD_HEAD].items()}
  z = lambda h: (h @ w["kernel"] + w["bias"]) / np.linalg.norm(h @ w["kernel"] + w["bias"],
                                                               axis=1, keepdims=True)
  z_v, z_w = z(img_tokens[:, 0]), z(txt_tokens[:, 0])
  z_t = np.asarray(teacher.embed_images(teacher.params, batch["image"]), np.float64)
  ids = np.asarray(batch["image_id"])
  valid = np.arange(BANK) < int(bank.count)
  keys = np.concatenate([z_t, np.asarray(bank.values["teacher"], np.float64)])
  key_ids = np.concatenate([ids, np.asarray(bank.ids)])
  # a bank entry of an image in this batch is a second copy of a batch key: never a negative
  key_ok = np.concatenate([np.ones(B, bool), valid & ~np.isin(np.asarray(bank.ids), ids)])
  tk = config.unimodal_kd.kd_temperature
  total = 0.0
  for zs in (z_v, z_w):
    for r in range(B):
      terms = [np.exp(zs[r] @ keys[j] / tk) for j in range(len(keys))
               if j == r or (key_ok[j] and key_ids[j] != ids[r])]
      total += -(zs[r] @ keys[r] / tk - np.log(np.sum(terms))) / B
  return l_cl + total, l_cl, total


def test_objective_equals_numpy_transcription(setup):
  ids = list(range(B))
  ids[7] = 3                                # a duplicate image in the batch
  batch = _batch(1, ids)
  got = _loss(setup, one_device_mesh(), batch, setup[5])
  want, l_cl, l_kd = _numpy_objective(setup, batch, setup[5])
  np.testing.assert_allclose(got.metrics["itc"], l_cl, rtol=1e-5)
  np.testing.assert_allclose(got.metrics["kd"], l_kd, rtol=1e-5)
  np.testing.assert_allclose(got.loss, want, rtol=1e-5)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(got.grads))
  assert np.abs(got.grads[unimodal_kd.KD_HEAD]["kernel"]).max() > 0


def test_the_bank_receives_the_batch_only_after_the_loss(setup):
  batch = _batch(2, range(200, 200 + B))
  config, model, head, teacher, params, bank = setup
  got = _loss(setup, one_device_mesh(), batch, bank)
  after = got.extra["bank"]
  z_t = np.asarray(teacher.embed_images(teacher.params, batch["image"]))
  slots = (10 + np.arange(B)) % BANK                      # ptr was 10; the oldest are overwritten
  np.testing.assert_allclose(np.asarray(after.values["teacher"])[slots], z_t, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(after.ids)[slots], np.arange(200, 200 + B))
  assert int(after.count) == BANK
  # the same loss with the batch's own features already in the bank: they are masked, not
  # counted as negatives a second time
  def bank_of(*entries):
    q = fq.create_queue(BANK + B, {"teacher": jax.ShapeDtypeStruct((TEACHER_WIDTH,), jnp.float32)})
    for keys, ids in entries:
      q = fq.enqueue(q, {"teacher": keys}, ids)
    return q
  earlier = (bank.values["teacher"][:10], bank.ids[:10])
  doubled = bank_of(earlier, (z_t, batch["image_id"]))
  np.testing.assert_allclose(_loss(setup, one_device_mesh(), batch, doubled).metrics["kd"],
                             _loss(setup, one_device_mesh(), batch, bank_of(earlier)).metrics["kd"],
                             rtol=1e-6)


def test_eight_devices_equal_one_device(setup):
  batch = _batch(3, range(B))
  many = _loss(setup, make_mesh(), batch, setup[5])
  assert make_mesh().size == 8
  one = _loss(setup, one_device_mesh(), batch, setup[5])
  assert_devices_agree(many, one)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), many.extra, one.extra)


def test_no_kd_reads_no_teacher_and_is_the_contrastive_loss_alone():
  config = _config("tiny,no_kd")
  assert unimodal_kd.teacher_names(config) == ()
  model = build_model(config.model)
  params = {STUDENT: init_params(model, config.model, jax.random.PRNGKey(0))}
  loss_fn = unimodal_kd.make_loss_fn(config, model, None, one_device_mesh())
  got = loss_and_grads(loss_fn, one_device_mesh(), params, _batch(4, range(B)))
  assert "kd" not in got.metrics and got.loss == pytest.approx(got.metrics["itc"])
  np.testing.assert_allclose(got.metrics["itc"],
                             got.metrics["itc_i2t"] + got.metrics["itc_t2i"], rtol=1e-6)


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_ssl_backbone_then_student_end_to_end(tmp_path):
  """The two commands of docs/unimodal_kd.md on the tiny presets: a DINO ViT of MiniLM's width,
  then the student started from its first layer and distilled from all of it; the student's
  table is printed, its image tower starts as the SSL ViT's first layer, and --mode=eval on val
  writes eval_val.json beside the test eval.json."""
  import json
  import subprocess
  import sys
  from conftest import REPO, user_env
  from jaxdistill.store.checkpoint import Checkpointer
  ssl, student = tmp_path / "ssl", tmp_path / "student"
  width = ["--config.model.vision_width=384", "--config.model.vision_layers=2",
           "--config.model.vision_heads=6", "--config.model.vision_mlp=1536"]
  run = lambda *args: subprocess.run([sys.executable, "-m", "jaxdistill.main", *args], cwd=REPO,
                                     env=user_env(), capture_output=True, text=True, timeout=600)
  done = run("--config=configs/ssl_vit.py:tiny", "--mode=pretrain_image", f"--workdir={ssl}",
             "--config.train.num_steps=2", "--config.probe.num_train=32",
             "--config.probe.num_test=32", "--config.probe.steps=2", *width)
  assert done.returncode == 0, done.stderr[-3000:]
  config = f"--config=configs/unimodal_kd.py:tiny,full,ssl={ssl}"
  done = run(config, f"--workdir={student}", "--config.train.num_steps=3")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"init_from workdir:{ssl} (step 2)" in done.stdout and "R@sum" in done.stdout
  metrics = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(m["kd"]) and m["kd"] > 0 for m in metrics)
  assert metrics[-1]["bank_filled"] > 0                    # step 3 saw the first two batches
  got = Checkpointer(str(student)).restore_raw(3)["params"]["student"]["image_encoder"]
  assert set(got["encoder"]) == {"layer_0", "ln_final"}
  done = run(config, f"--workdir={student}", "--mode=eval", "--config.eval.split=val")
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads((student / "eval_val.json").read_text())["split"] == "val"
  assert json.loads((student / "eval.json").read_text())["split"] == "test"
