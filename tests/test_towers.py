"""models/towers.py and pretrained/towers.py: the "vit" / "transformer" towers are today's ViT /
TextEncoder; real MiniLM-L6 layers selected with load_tower_params ("first:3", "last:3",
"0,2,4") in our BERT tower equal transformers' BertModel holding those layers (cosine >= 0.99999
per token); the EfficientNet-Lite0 tower's cells equal the pretrained module's feature map
pooled per cell; bad selections, paths and architectures give one CheckpointError."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdistill.config import base_config
from jaxdistill.data.compositional import IMAGE_MEAN, IMAGE_STD
from jaxdistill.data.tokenizer import encode, load_pretrained_tokenizer
from jaxdistill.errors import JaxDistillError
from jaxdistill.models import efficientnet_lite
from jaxdistill.models.bert import mean_pool
from jaxdistill.models.dual import DualEncoder, l2_normalize
from jaxdistill.models.text import TextEncoder
from jaxdistill.models.towers import BertTower, EfficientNetTower, image_tower, text_tower
from jaxdistill.models.vit import ViT
from jaxdistill.pretrained import efficientnet_lite as efficientnet_checkpoint
from jaxdistill.pretrained.checkpoint import CheckpointError
from jaxdistill.pretrained.packaged import efficientnet_path, minilm_dir
from jaxdistill.pretrained.towers import load_tower_params

import torch
import transformers

jax.config.update("jax_default_matmul_precision", "highest")

KEY = jax.random.PRNGKey(0)
SENTENCES = [
    "a sandal top left, a bag below it and two shirts on the right",
    "A man is riding a horse on the beach.",
    "two t-shirts on top",
    "A red square is to the left of a blue circle.",
    "a single ankle boot in the bottom right corner",
    "Sneakers, sandals and boots are lined up by the door.",
    "a coat",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
]


def _model_config(**overrides) -> ml_collections.ConfigDict:
  mc = base_config("tiny").model
  mc.update(overrides)
  return mc


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


# ------------------------------------------------------------ "vit" / "transformer": unchanged

def test_default_towers_equal_a_direct_vit_and_text_encoder():
  mc = _model_config()
  assert (mc.image_tower, mc.text_tower, mc.text_pool) == ("vit", "transformer", "cls")
  images = jax.random.normal(KEY, (2, mc.image_size, mc.image_size, mc.channels))
  ids = jax.random.randint(KEY, (2, mc.max_len), 5, mc.vocab_size)
  mask = jnp.ones_like(ids).at[1, 7:].set(0)
  direct_image = ViT(mc.patch_size, mc.vision_width, mc.vision_layers, mc.vision_heads,
                     mc.vision_mlp, stem=mc.stem, dropout_rate=mc.dropout_rate)
  direct_text = TextEncoder(mc.vocab_size, mc.max_len, mc.text_width, mc.text_layers,
                            mc.text_heads, mc.text_mlp, dropout_rate=mc.dropout_rate)
  for ours, theirs, args in ((image_tower(mc), direct_image, (images,)),
                             (text_tower(mc), direct_text, (ids, mask))):
    assert ours == theirs
    params, want = ours.init(KEY, *args)["params"], theirs.init(KEY, *args)["params"]
    jax.tree.map(np.testing.assert_array_equal, params, want)
    np.testing.assert_array_equal(ours.apply({"params": params}, *args),
                                  theirs.apply({"params": want}, *args))


def test_unknown_tower_names_the_key():
  with pytest.raises(ValueError, match=r"model\.image_tower='resnet'.*vit, efficientnet_lite0"):
    image_tower(_model_config(image_tower="resnet"))
  with pytest.raises(ValueError, match=r"model\.text_tower='gpt'.*transformer, bert"):
    text_tower(_model_config(text_tower="gpt"))


def test_text_pool_mean_and_cls():
  mc = _model_config()
  ids = jax.random.randint(KEY, (3, mc.max_len), 5, mc.vocab_size)
  mask = jnp.ones_like(ids).at[1, 4:].set(0).at[2, 9:].set(0)
  for pool in ("cls", "mean"):
    dual = DualEncoder(image_tower(mc), text_tower(mc), mc.embed_dim, text_pool=pool)
    params = dual.init(KEY, jnp.zeros((1, 56, 56, 1)), ids[:1], mask[:1])["params"]
    emb, tokens = dual.apply({"params": params}, ids, mask, method=DualEncoder.encode_text)
    pooled = tokens[:, 0] if pool == "cls" else mean_pool(tokens, mask)
    p = params["text_projection"]
    np.testing.assert_allclose(emb, l2_normalize(pooled @ p["kernel"] + p["bias"]), atol=1e-6)
  with pytest.raises(ValueError, match="text_pool='max'"):
    DualEncoder(image_tower(mc), text_tower(mc), 8, text_pool="max").init(
        KEY, jnp.zeros((1, 56, 56, 1)), ids[:1], mask[:1])


# ------------------------------------------------------------------- BERT tower, real MiniLM-L6

@pytest.fixture(scope="module")
def minilm():
  """(directory, ids, mask, the 6-layer torch BertModel) for SENTENCES, MiniLM's tokenizer."""
  directory = minilm_dir()
  ids, mask = encode(load_pretrained_tokenizer(directory), SENTENCES, max_len=24)
  assert (mask.sum(1) < 24).any() and (ids[:, 0] == 101).all()   # padded rows, [CLS] = 101
  return directory, ids, mask, transformers.BertModel.from_pretrained(directory).eval()


def _torch_tokens(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()


def _reference(directory, full, selection):
  """A torch BertModel of len(selection) layers: layer i = MiniLM layer selection[i]."""
  if selection == [0, 1, 2]:
    return transformers.BertModel.from_pretrained(directory, num_hidden_layers=3).eval()
  config = transformers.BertConfig.from_pretrained(directory, num_hidden_layers=len(selection))
  rename = {old: new for new, old in enumerate(selection)}
  state = {}
  for key, value in full.state_dict().items():
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
    if not m:
      state[key] = value
    elif int(m.group(1)) in rename:
      state[f"encoder.layer.{rename[int(m.group(1))]}.{m.group(2)}"] = value
  model = transformers.BertModel(config, add_pooling_layer="pooler.dense.weight" in state)
  model.load_state_dict(state)
  return model.eval()


@pytest.mark.parametrize("layers, selection", [("first:3", [0, 1, 2]), ("last:3", [3, 4, 5]),
                                               ("0,2,4", [0, 2, 4])])
def test_bert_tower_layers_equal_torch(minilm, layers, selection):
  directory, ids, mask, full = minilm
  params, info = load_tower_params(directory, "bert", layers)
  assert info["layers"] == selection and info["checkpoint_layers"] == 6
  mc = _model_config(max_len=24, **info["model"])
  assert (mc.text_tower, mc.text_layers, mc.text_width, mc.vocab_size) == ("bert", 3, 384, 30522)
  tower = text_tower(mc)
  assert isinstance(tower, BertTower)
  assert _shapes(params) == _shapes(jax.eval_shape(tower.init, KEY, ids, mask)["params"])
  got = np.asarray(jax.jit(tower.apply)({"params": params}, ids, mask))
  want = _torch_tokens(_reference(directory, full, selection), ids, mask)
  real = mask.astype(bool)
  cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
  assert cosine[real].min() >= 0.99999, cosine[real].min()
  assert np.abs(got - want)[real].max() <= 1e-3


@pytest.mark.parametrize("layers, message", [
    ("first:9", r"'first:9' is out of range: the checkpoint has 6 layers"),
    ("last:0", r"'last:0' is out of range: the checkpoint has 6 layers"),
    ("a,b", r"'a,b' is malformed"),
    ("0,6", r"'0,6' is out of range or repeats a layer"),
    ("middle:2", r"'middle:2' is malformed"),
])
def test_bad_layer_selection_is_one_clear_error(layers, message):
  with pytest.raises(CheckpointError, match=message + r".*first:N or last:N with 1 <= N <= 6"):
    load_tower_params(minilm_dir(), "bert", layers)


def test_bad_path_and_architecture(tmp_path):
  with pytest.raises(CheckpointError, match=r"does not exist: .*nowhere"):
    load_tower_params(str(tmp_path / "nowhere"), "bert")
  with pytest.raises(CheckpointError, match=r"unknown tower architecture 'vit'.*bert, "
                     r"efficientnet_lite0"):
    load_tower_params(minilm_dir(), "vit")
  with pytest.raises(CheckpointError, match=r"no config\.json"):
    load_tower_params(str(tmp_path), "bert")
  with pytest.raises(CheckpointError, match=r"'first:2' does not apply to efficientnet_lite0"):
    load_tower_params(efficientnet_path(), "efficientnet_lite0", "first:2")
  assert issubclass(CheckpointError, JaxDistillError)


# ----------------------------------------------------------------- EfficientNet-Lite0 tower

def test_efficientnet_tower_cells_equal_the_pretrained_feature_map():
  mc = _model_config(image_tower="efficientnet_lite0", efficientnet_input_size=128)
  assert (mc.image_mean, mc.image_std) == (IMAGE_MEAN, IMAGE_STD)   # the data's normalisation
  images = jax.random.normal(KEY, (2, 56, 56, 1))
  params, info = load_tower_params(efficientnet_path(), "efficientnet_lite0")
  assert info["model"] == {"image_tower": "efficientnet_lite0", "vision_width": 1280}
  tower = image_tower(mc)
  assert isinstance(tower, EfficientNetTower)
  assert _shapes(params) == _shapes(jax.eval_shape(tower.init, KEY, images)["params"])
  tokens = np.asarray(jax.jit(tower.apply)({"params": params}, images))
  assert tokens.shape == (2, 1 + 4, 1280)

  # The unfolded pretrained module (BatchNorm with running stats) on the same ImageNet input.
  module, variables = efficientnet_checkpoint.load(efficientnet_path())
  pixels = jax.image.resize(images * IMAGE_STD + IMAGE_MEAN, (2, 128, 128, 1), "bilinear")
  fmap = np.asarray(module.apply(variables, efficientnet_lite.normalize(
      jnp.repeat(pixels, 3, axis=-1)), method=efficientnet_lite.EfficientNetLite0.feature_map))
  assert fmap.shape == (2, 4, 4, 1280)
  cells = fmap.reshape(2, 2, 2, 2, 2, 1280).mean(axis=(2, 4)).reshape(2, 4, 1280)  # TL TR BL BR
  np.testing.assert_allclose(tokens[:, 1:], cells, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(tokens[:, 0], cells.mean(1), atol=1e-4, rtol=1e-4)


def test_efficientnet_tower_input_size_must_tile_the_cells():
  tower = image_tower(_model_config(image_tower="efficientnet_lite0", efficientnet_input_size=96))
  with pytest.raises(ValueError, match=r"efficientnet_input_size=96 must be a multiple of 32 x 2"):
    jax.eval_shape(tower.init, KEY, jnp.zeros((1, 56, 56, 1)))
