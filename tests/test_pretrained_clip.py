"""Parity of the Flax CLIP port with transformers' PyTorch CLIPModel (tiny random weights saved
with save_pretrained, loaded through jaxdistill; float32, max abs diff <= 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

import torch
import transformers
import safetensors.torch as safetensors_torch

import jax.numpy as jnp  # noqa: E402

from jaxdistill.pretrained import clip  # noqa: E402
from jaxdistill.pretrained.checkpoint import CheckpointError  # noqa: E402
from jaxdistill.pretrained.registry import load_pretrained  # noqa: E402

TOL = 1e-4
VOCAB, LENGTH = 100, 8
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _clip(hidden_act="quick_gelu", eos_token_id=2, num_layers=2):
  tower = {**TOWER, "num_hidden_layers": num_layers, "hidden_act": hidden_act}
  config = transformers.CLIPConfig(
      text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=16,
                       eos_token_id=eos_token_id),
      vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config)
  with torch.no_grad():  # HF initialises layer norms to 1/0: randomise them too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn(p.shape) * 0.3)
  return model.eval()


def _inputs(eos_token_id):
  """3 texts of lengths 8, 5, 3 ending in EOS and padded after it, 3 images (NCHW)."""
  rng = np.random.default_rng(0)
  lengths = (8, 5, 3)
  ids = rng.integers(8, VOCAB - 1, size=(3, LENGTH))  # neither EOS id inside a text
  mask = np.zeros((3, LENGTH), np.int64)
  for row, n in enumerate(lengths):
    mask[row, :n] = 1
    # legacy (eos 2): EOS is the largest id (argmax pooling); new: an id with pad == EOS
    ids[row, n - 1:] = VOCAB - 1 if eos_token_id == 2 else eos_token_id
  pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  return ids, mask, pixels


@pytest.mark.parametrize("hidden_act,eos_token_id", [("quick_gelu", 2), ("gelu", 7)],
                         ids=["quick_gelu_legacy_eos", "gelu_eos_id"])
def test_clip_parity(tmp_path, hidden_act, eos_token_id):
  model = _clip(hidden_act, eos_token_id)
  model.save_pretrained(tmp_path)
  module, params, _ = load_pretrained(str(tmp_path))
  assert isinstance(module, clip.CLIP) and module.text.activation == hidden_act
  ids, mask, pixels = _inputs(eos_token_id)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=torch.from_numpy(pixels))
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  logits = module.apply({"params": params}, images, jnp.asarray(ids), jnp.asarray(mask))
  image_emb = clip.embed_images(module, params, images)
  text_emb = clip.embed_texts(module, params, jnp.asarray(ids), jnp.asarray(mask))
  tokens, _ = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                           method=lambda m, i, k: m.text(i, k))
  patches, pooled = module.apply({"params": params}, images, method=lambda m, x: m.vision(x))
  pairs = [(logits, out.logits_per_image), (image_emb, out.image_embeds),
           (text_emb, out.text_embeds), (tokens, out.text_model_output.last_hidden_state),
           (patches, out.vision_model_output.last_hidden_state),
           (pooled, out.vision_model_output.pooler_output)]
  for ours, theirs in pairs:
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=TOL, rtol=0)


def test_truncation_matches_a_shorter_model(tmp_path):
  """layers="first:1" on a 2-layer CLIP equals a 1-layer CLIP holding the same first layers."""
  model = _clip()
  model.save_pretrained(tmp_path)
  short = _clip(num_layers=1)
  short.load_state_dict({k: v for k, v in model.state_dict().items()
                         if ".encoder.layers.1." not in k})
  module, params, _ = load_pretrained(str(tmp_path), layers="first:1")
  assert module.vision.num_layers == module.text.num_layers == 1
  ids, mask, pixels = _inputs(2)
  with torch.no_grad():
    out = short(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=torch.from_numpy(pixels))
  logits = module.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                        jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(logits), out.logits_per_image.numpy(), atol=TOL, rtol=0)


def test_missing_and_unexpected_keys_are_named(tmp_path):
  model = _clip()
  model.save_pretrained(tmp_path)
  state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "logit_scale"}
  state["text_model.extra.weight"] = torch.zeros(2)
  safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"1 missing.*'logit_scale \(\)'.*"
                     r"1 unexpected checkpoint keys: 'text_model\.extra\.weight"):
    load_pretrained(str(tmp_path))


def test_unknown_architecture_and_wrong_path(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_pretrained(str(tmp_path / "nowhere"))
  model = _clip()
  model.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="unknown architecture 'SigLIP'"):
    load_pretrained(str(tmp_path), architecture="SigLIP")
