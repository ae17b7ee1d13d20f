"""BERT checkpoints: a tiny random transformers BertModel saved to disk and loaded through
jaxdistill gives the same tokens / CLS / mean-pooled outputs (float32, max abs diff <= 1e-4);
layer selection equals the torch model with fewer layers; bad checkpoints give one clear error."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxdistill.models.bert import Bert, cls_pool, mean_pool
from jaxdistill.pretrained import bert
from jaxdistill.pretrained.checkpoint import CheckpointError, read_state_dict, select_layers
from jaxdistill.pretrained.registry import load_pretrained

import torch
import transformers

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
CONFIG = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=16, type_vocab_size=2,
              layer_norm_eps=1e-7)


def _random_bert(directory, hidden_act="gelu", safe_serialization=True):
  """Tiny BertModel with every parameter (LayerNorms included) drawn at random, saved to
  directory; returns the torch model in eval mode."""
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**CONFIG, hidden_act=hidden_act)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.save_pretrained(directory, safe_serialization=safe_serialization)
  return model


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CONFIG["vocab_size"], (3, 9))
  mask = np.ones((3, 9), np.int64)
  mask[1, 5:] = 0
  mask[2, 2:] = 0
  types = np.zeros((3, 9), np.int64)
  types[:, 4:] = 1
  return ids, mask, types


def _torch_tokens(model, ids, mask, types):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types)).last_hidden_state.numpy()


def _torch_mean(tokens, mask):
  weights = mask[..., None].astype(np.float32)
  return (tokens * weights).sum(1) / weights.sum(1)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_bert_matches_torch_cls_and_mean_pooling(tmp_path, hidden_act):
  model = _random_bert(tmp_path, hidden_act)
  module, params, config = load_pretrained(str(tmp_path))
  assert config["hidden_act"] == hidden_act and isinstance(module, Bert)
  ids, mask, types = _inputs()
  want = _torch_tokens(model, ids, mask, types)
  got = np.asarray(module.apply({"params": params}, ids, mask, types))
  assert np.abs(got - want).max() <= TOL
  assert np.abs(np.asarray(cls_pool(got)) - want[:, 0]).max() <= TOL
  assert np.abs(np.asarray(mean_pool(got, mask)) - _torch_mean(want, mask)).max() <= TOL


def test_bin_and_wrapped_pth_read_like_safetensors(tmp_path):
  model = _random_bert(tmp_path / "bin", safe_serialization=False)
  assert os.listdir(tmp_path / "bin").count("pytorch_model.bin") == 1
  torch.save({"model": model.state_dict()}, tmp_path / "wrapped.pth")
  from_bin = read_state_dict(str(tmp_path / "bin"))
  from_pth = read_state_dict(str(tmp_path / "wrapped.pth"))
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(from_pth[key], value.numpy())
    if key in from_bin:  # save_pretrained drops non-persistent buffers
      np.testing.assert_array_equal(from_bin[key], value.numpy())
  module, params, _ = load_pretrained(str(tmp_path / "bin"))
  ids, mask, types = _inputs()
  got = np.asarray(module.apply({"params": params}, ids, mask, types))
  assert np.abs(got - _torch_tokens(model, ids, mask, types)).max() <= TOL


def test_bf16_safetensors_and_unsafe_pickle(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  weight = torch.randn(3, 5)
  save_file({"w": weight.bfloat16()}, str(tmp_path / "half.safetensors"))
  read = read_state_dict(str(tmp_path / "half.safetensors"))["w"]
  np.testing.assert_array_equal(read.astype(np.float32), weight.bfloat16().float().numpy())
  torch.save({"model": {"w": weight}, "optimizer": _NotATensor()}, tmp_path / "pickle.pth")
  with pytest.raises(CheckpointError, match=r"weights_only=True\) failed"):
    read_state_dict(str(tmp_path / "pickle.pth"))


class _NotATensor:
  """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_truncation_equals_torch_with_fewer_layers(tmp_path):
  _random_bert(tmp_path)
  module, params, _ = load_pretrained(str(tmp_path), layers="first:1")
  assert module.num_layers == 1 and "layer_1" not in params
  short = transformers.BertModel.from_pretrained(str(tmp_path), num_hidden_layers=1).eval()
  ids, mask, types = _inputs()
  got = np.asarray(module.apply({"params": params}, ids, mask, types))
  assert np.abs(got - _torch_tokens(short, ids, mask, types)).max() <= TOL
  with pytest.raises(CheckpointError, match=r"'first:3' is out of range: the checkpoint has 2"):
    select_layers(read_state_dict(str(tmp_path)), bert.LAYER_PATTERN, "first:3")


def _save_state(directory, state):
  """Re-save a (modified) state dict as model.safetensors in directory."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(directory, "model.safetensors"))


def test_wrong_path_and_unknown_architecture(tmp_path):
  with pytest.raises(CheckpointError, match=r"does not exist: .*nowhere"):
    load_pretrained(str(tmp_path / "nowhere"))
  _random_bert(tmp_path)
  with pytest.raises(CheckpointError, match=r"unknown architecture 'GPT2Model'.*'BertModel'"):
    load_pretrained(str(tmp_path), architecture="GPT2Model")
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  config.update(architectures=["FooModel"], model_type="foo")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match=r"unknown architecture 'FooModel'.*known are"):
    load_pretrained(str(tmp_path))
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(CheckpointError, match=r"unknown checkpoint file type: .*weights\.npz"):
    read_state_dict(str(tmp_path / "weights.npz"))


def test_missing_key_names_it_with_expected_shape(tmp_path):
  _random_bert(tmp_path)
  state = read_state_dict(str(tmp_path))
  del state["encoder.layer.1.attention.self.key.weight"]
  _save_state(tmp_path, state)
  with pytest.raises(CheckpointError,
                     match=r"1 missing .*'layer_1/attention/key/kernel \(32, 32\)'") as error:
    load_pretrained(str(tmp_path))
  assert "unexpected" not in str(error.value)


def test_unexpected_key_names_it(tmp_path):
  _random_bert(tmp_path)
  state = read_state_dict(str(tmp_path))
  state["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((32, 32), np.float32)
  _save_state(tmp_path, state)
  with pytest.raises(CheckpointError, match=r"1 unexpected checkpoint keys: "
                     r"'encoder\.layer\.0\.attention\.self\.rotary\.weight"):
    load_pretrained(str(tmp_path))


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
  _random_bert(tmp_path)
  state = read_state_dict(str(tmp_path))
  key = "encoder.layer.0.intermediate.dense.weight"
  state[key] = state[key][:40]
  _save_state(tmp_path, state)
  with pytest.raises(CheckpointError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight'.*"
                     r"expects \(48, 32\), the checkpoint has \(40, 32\)"):
    load_pretrained(str(tmp_path))
