"""Parity of the Flax ViT / BEiT / data2vec-vision encoders with transformers' PyTorch models.

Each test builds a tiny random-weight ViTModel / BeitModel / Data2VecVisionModel, saves it with
save_pretrained, loads it through jaxdistill and compares tokens and pooled output on the same
images (float32, max abs diff <= 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

import torch
import transformers

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdistill.pretrained import vit  # noqa: E402
from jaxdistill.pretrained.checkpoint import CheckpointError, read_config  # noqa: E402
from jaxdistill.pretrained.registry import load_pretrained  # noqa: E402

TOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8)


def _randomize(model):
  """Random values for every parameter (HF zero-initialises some: BEiT tables, cls token)."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
  return model.eval()


def _save(model, path):
  model.save_pretrained(path)
  return str(path)


def _images(n=2, size=32):
  return np.random.default_rng(1).normal(size=(n, 3, size, size)).astype(np.float32)


def _compare(model, path, *, layers=None):
  module, params, _ = load_pretrained(path, layers=layers)
  pixels = _images()
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels))
  tokens, pooled = module.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(tokens), out.last_hidden_state.numpy(), atol=TOL, rtol=0)
  if out.pooler_output is not None:
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=TOL, rtol=0)
  return module, params


def test_vit_parity(tmp_path):
  model = _randomize(transformers.ViTModel(transformers.ViTConfig(**TINY)))
  module, params = _compare(model, _save(model, tmp_path))
  assert module.pooler == "tanh" and module.absolute_positions
  # one file (config.json beside it) loads the same params as the directory
  _, from_file, _ = load_pretrained(str(tmp_path / "model.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, from_file, params)


@pytest.mark.parametrize("options", [
    dict(use_relative_position_bias=True, use_mean_pooling=True),
    dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
         use_mean_pooling=False),
], ids=["per_layer_mean_pool", "shared_absolute_cls"])
def test_beit_parity(tmp_path, options):
  model = _randomize(transformers.BeitModel(transformers.BeitConfig(**TINY, **options)))
  module, params = _compare(model, _save(model, tmp_path))
  layer = params["encoder"]["layer_0"]
  assert "lambda_1" in layer and "bias" not in layer["attention"]["key"]
  assert ("relative_position_bias" in layer) == options.get("use_relative_position_bias", False)


def test_data2vec_vision_parity(tmp_path):
  config = transformers.Data2VecVisionConfig(**TINY, use_relative_position_bias=True)
  model = _randomize(transformers.Data2VecVisionModel(config, add_pooling_layer=True))
  _compare(model, _save(model, tmp_path))


def test_classification_checkpoint_loads_its_encoder(tmp_path):
  """ViTForImageClassification: 'vit.' prefix stripped, classifier ignored, no pooler."""
  model = _randomize(transformers.ViTForImageClassification(
      transformers.ViTConfig(**TINY, num_labels=3)))
  module, params = _compare(model.vit, _save(model, tmp_path))
  assert module.pooler is None and "pooler" not in params


def test_truncation_matches_a_shorter_model(tmp_path):
  """Loading the first layer of a 2-layer ViT equals a 1-layer ViT with the same weights."""
  model = _randomize(transformers.ViTModel(transformers.ViTConfig(**TINY)))
  path = _save(model, tmp_path / "full")
  short = transformers.ViTModel(transformers.ViTConfig(**{**TINY, "num_hidden_layers": 1}))
  short.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("encoder.layer.1.")})
  module, params = _compare(short.eval(), path, layers="first:1")
  assert module.num_layers == 1 and "layer_1" not in params["encoder"]
  with pytest.raises(CheckpointError, match="'first:3' is out of range"):
    load_pretrained(path, layers="first:3")


def test_shape_mismatch_names_the_key(tmp_path):
  model = _randomize(transformers.ViTModel(transformers.ViTConfig(**TINY)))
  path = _save(model, tmp_path)
  config = read_config(path) | {"image_size": 40}  # 5x5 patches + CLS instead of 4x4 + CLS
  with pytest.raises(CheckpointError, match=r"'embeddings\.position_embeddings'.*"
                     r"expects \(1, 26, 32\), the checkpoint has \(1, 17, 32\)"):
    vit.load(path, config)


def test_wrong_image_size_is_refused(tmp_path):
  model = _randomize(transformers.ViTModel(transformers.ViTConfig(**TINY)))
  module, params, _ = load_pretrained(_save(model, tmp_path))
  with pytest.raises(ValueError, match="resize the images to 32x32"):
    module.apply({"params": params}, jnp.zeros((1, 48, 48, 3)))
