"""The "hf_vit" student image tower (models/towers.py HFViTTower over models/hf_vit.ImageEncoder),
the "hf_vit" init_from architecture (pretrained/towers.py, tower_configs.hf_vit), the image-only
pretrained teacher (teachers/pretrained.py) and configs/unimodal_kd.py's image= / text=, against
tiny random transformers checkpoints (BeitModel, ViTModel, Data2VecVisionModel) saved here:

- parity: the tower started from "first:2" or "1,3" of a 4-layer checkpoint = transformers' model
  holding those layers (last_hidden_state: [CLS] and patches, after the final LayerNorm when the
  checkpoint has one);
- the adapter: grey benchmark images (normalised as data/compositional.py does) = transformers fed
  the RGB version through the checkpoint's own image processor (per-channel mean / std from its
  preprocessor_config.json), at the checkpoint's size and, for a 112-px checkpoint, resized;
- the teacher's embed_images = transformers' L2-normalised [CLS];
- configs/unimodal_kd.py:tiny,image=DIR trains end to end (slow); unequal widths are refused.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from jaxdistill.config import ConfigError, base_config, load_config_file, validate
from jaxdistill.data.compositional import normalize_images
from jaxdistill.models.towers import HFViTTower, image_tower, image_width
from jaxdistill.pretrained import tower_configs
from jaxdistill.pretrained.checkpoint import CheckpointError
from jaxdistill.teachers import load_teacher
from jaxdistill.train.init import apply_init_from

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-5
TINY = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
            image_size=56, patch_size=14)
# per-channel normalisation written to preprocessor_config.json (not the 0.5 defaults)
MEAN, STD = [0.45, 0.5, 0.55], [0.2, 0.25, 0.3]
KINDS = {
    # per-layer relative bias, layer scale, [CLS] + final LayerNorm
    "beit": lambda **kw: transformers.BeitModel(transformers.BeitConfig(
        **kw, use_relative_position_bias=True, use_mean_pooling=False)),
    # shared relative bias + absolute positions, mean pooling: no final LayerNorm
    "beit_shared_mean": lambda **kw: transformers.BeitModel(transformers.BeitConfig(
        **kw, use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
        use_mean_pooling=True)),
    "vit": lambda **kw: transformers.ViTModel(transformers.ViTConfig(**kw)),
    "data2vec": lambda **kw: transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(
        **kw, use_relative_position_bias=True, use_mean_pooling=False)),
}


def _processor(kind):
  cls = transformers.ViTImageProcessor if kind == "vit" else transformers.BeitImageProcessor
  return cls(image_mean=MEAN, image_std=STD)


def _checkpoint(path, kind="beit", **overrides):
  """A random-weight transformers model of `kind`, saved with its image processor under path."""
  torch.manual_seed(0)
  model = KINDS[kind](**{**TINY, **overrides})
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():   # HF zero-initialises some (BEiT tables, [CLS]): random everywhere
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  model.eval().save_pretrained(path)
  _processor(kind).save_pretrained(path)
  return model, str(path)


def _hf_tokens(model, pixels, layers=None):
  """transformers' last_hidden_state [B, 1+P, D] for NCHW pixels, with only `layers` kept."""
  if layers is not None:
    model = copy.deepcopy(model)
    model.encoder.layer = torch.nn.ModuleList([model.encoder.layer[i] for i in layers])
  with torch.no_grad():
    return model(pixel_values=torch.as_tensor(pixels)).last_hidden_state.numpy()


def _grey(n=3, size=56, seed=0):
  """uint8 grey pictures [n, size, size] (benchmark-like: mostly dark, some bright strokes)."""
  rng = np.random.default_rng(seed)
  return (rng.random((n, size, size)) ** 3 * 255).astype(np.uint8)


def _processed(kind, grey):
  """The checkpoint's image processor on the RGB version of grey pictures: NCHW float32."""
  rgb = [np.repeat(g[..., None], 3, axis=-1) for g in grey]
  crop = {} if kind == "vit" else {"do_center_crop": False}   # ViT's processor has no crop
  out = _processor(kind)(images=rgb, do_resize=False, return_tensors="np", **crop)
  return out["pixel_values"].astype(np.float32)


def _tower_from(path, layers, **model_overrides):
  """(tower, params {"image_encoder": ...}, config): tower_configs.hf_vit + init_from, as a run
  starts its student's image tower."""
  config = base_config("tiny")
  tower_configs.hf_vit(config, "", path, layers)
  mc = ml_collections.ConfigDict({**config.model.to_dict(), **model_overrides})
  tower = image_tower(mc)
  images = jnp.zeros((1, mc.image_size, mc.image_size, mc.channels))
  params = {"image_encoder": jax.device_get(tower.init(jax.random.PRNGKey(1), images)["params"])}
  params, log = apply_init_from(params, config.init_from)
  assert len(log) == 1 and f"pretrained:{path}" in log[0]
  return tower, params["image_encoder"], config


# --- (a) parity of the selected layers -----------------------------------------------------------

@pytest.mark.parametrize("layers,kept", [("first:2", [0, 1]), ("1,3", [1, 3])],
                         ids=["first2", "layers1_3"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_selected_layers_equal_transformers(tmp_path, kind, layers, kept):
  model, path = _checkpoint(tmp_path, kind)
  # checkpoint-sized RGB input normalised with its constants: the tower's adapter is the identity
  pixels = np.random.default_rng(1).normal(size=(2, 3, 56, 56)).astype(np.float32)
  tower, params, config = _tower_from(path, layers, image_mean=MEAN, image_std=STD, channels=3)
  m = config.model
  assert (m.image_tower, m.vision_layers, m.vision_width, image_width(m)) == ("hf_vit", 2, 48, 48)
  assert m.hf_vit_image_mean == tuple(MEAN) and m.hf_vit_image_std == tuple(STD)
  assert m.hf_vit_final_norm == (kind != "beit_shared_mean")
  assert set(params["vit"]["encoder"]) >= {"layer_0", "layer_1"}
  assert "layer_2" not in params["vit"]["encoder"] and "pooler" not in params["vit"]
  got = np.asarray(tower.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  want = _hf_tokens(model, pixels, kept)
  assert got.shape == want.shape == (2, 1 + 16, 48)
  np.testing.assert_allclose(got, want, atol=TOL * max(1.0, np.abs(want).max()), rtol=0)
  # a different selection gives different tokens (the test can tell layers apart)
  other = _hf_tokens(model, pixels, [2, 3])
  assert np.abs(other - want).max() > 1e-2


# --- (b) the adapter: benchmark images -> the checkpoint's input ---------------------------------

@pytest.mark.parametrize("kind,size", [("beit", 56), ("vit", 56), ("beit", 112)])
def test_grey_benchmark_images_equal_the_processed_rgb_input(tmp_path, kind, size):
  model, path = _checkpoint(tmp_path, kind, image_size=size, num_hidden_layers=2)
  grey = _grey()
  tower, params, config = _tower_from(path, "")   # model.image_mean / std: the benchmark's
  assert isinstance(tower, HFViTTower) and config.model.hf_vit_image_size == size
  got = np.asarray(tower.apply({"params": params}, normalize_images(grey)))
  pixels = _processed(kind, grey)
  if size != 56:   # bilinear, half-pixel centres (torch's upsampling = jax.image.resize's)
    pixels = torch.nn.functional.interpolate(torch.as_tensor(pixels), size=(size, size),
                                             mode="bilinear", align_corners=False).numpy()
  want = _hf_tokens(model, pixels)
  assert got.shape == want.shape == (3, 1 + (size // 14) ** 2, 48)
  np.testing.assert_allclose(got, want, atol=TOL * max(1.0, np.abs(want).max()), rtol=0)


def test_adapter_refuses_images_it_cannot_map(tmp_path):
  _, path = _checkpoint(tmp_path, "vit", num_hidden_layers=1)
  tower, params, _ = _tower_from(path, "")
  with pytest.raises(ValueError, match=r"images \[B, 56, 56, 2\] cannot feed an encoder of 3"):
    tower.apply({"params": params}, jnp.zeros((1, 56, 56, 2)))


# --- (c) the image-only pretrained teacher -------------------------------------------------------

@pytest.mark.parametrize("kind", ["vit", "beit"])
def test_image_teacher_is_the_normalised_cls_of_transformers(tmp_path, kind):
  model, path = _checkpoint(tmp_path, kind, num_hidden_layers=2)
  teacher = load_teacher(f"pretrained:{path}")       # kind "pretrained", as config.teachers reads
  assert teacher.embed_texts is None and teacher.match_scores is None and not teacher.is_dual
  grey = _grey()
  pixels = _processed(kind, grey)
  want = _hf_tokens(model, pixels)[:, 0]
  want = want / np.linalg.norm(want, axis=1, keepdims=True)
  # images at the checkpoint's resolution and normalisation go in as they are
  got = np.asarray(teacher.embed_images(teacher.params, jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  # benchmark images (grey, benchmark-normalised) are adapted first
  got = np.asarray(teacher.embed_images(teacher.params, normalize_images(grey)))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


# --- (d) configs/unimodal_kd.py with image= / text= ----------------------------------------------

def _bert_dir(path, width):
  config = transformers.BertConfig(vocab_size=64, hidden_size=width, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=2 * width)
  transformers.BertModel(config).save_pretrained(path)
  return str(path)


def test_image_and_text_checkpoints_build_the_student_config(tmp_path):
  _, image = _checkpoint(tmp_path / "beit", "beit")
  text = _bert_dir(tmp_path / "bert", 48)
  config = load_config_file(f"configs/unimodal_kd.py:cpu,full,image={image},text={text}")
  m = config.model
  assert (m.image_tower, m.vision_layers, m.text_tower, m.text_layers) == ("hf_vit", 2, "bert", 1)
  assert (m.text_width, m.vision_width, m.shared_heads, m.shared_mlp) == (48, 48, 4, 96)
  assert config.data.tokenizer == text
  assert [(e["source"], e["architecture"], e["layers"]) for e in config.init_from] == [
      (f"pretrained:{text}", "bert", "first:1"), (f"pretrained:{image}", "hf_vit", "first:2")]
  assert (config.teachers.ssl.kind, config.teachers.ssl.path) == ("pretrained", image)
  every = load_config_file(f"configs/unimodal_kd.py:cpu,every_second,image={image},text={text}")
  assert [e["layers"] for e in every.init_from] == ["0", "0,2"]


def test_unequal_widths_and_bad_arguments_are_refused(tmp_path):
  _, image = _checkpoint(tmp_path / "beit", "beit")          # 48 wide; MiniLM is 384
  with pytest.raises(ConfigError, match=r"image tower \(.*beit\) is 48 wide and the text tower "
                     r"\(.*\) 384"):
    load_config_file(f"configs/unimodal_kd.py:tiny,image={image}")
  with pytest.raises(ConfigError, match="ssl= or image= \\(not both\\)"):
    load_config_file(f"configs/unimodal_kd.py:tiny,ssl=runs/x,image={image}")
  text = _bert_dir(tmp_path / "bert", 48)
  with pytest.raises(CheckpointError, match="not a ViT / BEiT / data2vec-vision one"):
    load_config_file(f"configs/unimodal_kd.py:tiny,image={text},text={text}")
  with pytest.raises(CheckpointError, match="no config.json"):
    load_config_file(f"configs/unimodal_kd.py:tiny,image={tmp_path / 'missing'}")


def test_validate_checks_the_hf_vit_fields(tmp_path):
  _, image = _checkpoint(tmp_path / "beit", "beit")
  text = _bert_dir(tmp_path / "bert", 48)
  config = load_config_file(f"configs/unimodal_kd.py:tiny,image={image},text={text}")
  validate(config, 1)
  config.model.hf_vit_image_mean = (0.5, 0.5)
  with pytest.raises(ConfigError, match=r"hf_vit_image_mean=\(0.5, 0.5\) needs one value per "
                     r"channel \(--config.model.hf_vit_channels=3\)"):
    validate(config, 1)
  config.model.hf_vit_image_mean = tuple(MEAN)
  config.model.hf_vit_patch_size = 15
  with pytest.raises(ConfigError, match="hf_vit_patch_size=15 must divide"):
    validate(config, 1)


@pytest.mark.slow
def test_unimodal_kd_from_a_beit_checkpoint_end_to_end(tmp_path):
  """configs/unimodal_kd.py:tiny,image=<tiny BEiT, 384 wide like MiniLM>: the student's image
  tower starts as the BEiT's first layer, the whole BEiT is the KD teacher (benchmark images
  adapted to its RGB input); 2 steps through the real trainer, then the eval table."""
  import json
  import subprocess
  import sys
  from conftest import REPO, user_env
  from jaxdistill.store.checkpoint import Checkpointer
  model, image = _checkpoint(tmp_path / "beit", "beit", hidden_size=384, num_attention_heads=6,
                             intermediate_size=768, num_hidden_layers=2)
  workdir = tmp_path / "student"
  done = subprocess.run(
      [sys.executable, "-m", "jaxdistill.main", f"--workdir={workdir}",
       f"--config=configs/unimodal_kd.py:tiny,image={image}", "--config.train.num_steps=2"],
      cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"init_from pretrained:{image} (layers [0])" in done.stdout and "R@sum" in done.stdout
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(metrics) == 2 and all(np.isfinite(m["kd"]) and m["kd"] > 0 for m in metrics)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["teachers"]["ssl"]["kind"] == "pretrained"
  assert saved["model"]["image_tower"] == "hf_vit" and saved["model"]["vision_layers"] == 1
  checkpointer = Checkpointer(str(workdir))
  got = checkpointer.restore_raw(2)["params"]["student"]["image_encoder"]["vit"]
  checkpointer.close()
  assert set(got["encoder"]) == {"layer_0"} and "final_norm" in got
  assert json.loads((workdir / "eval.json").read_text())["split"] == "test"
