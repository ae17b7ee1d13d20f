"""BLIP ITM cross encoder: a tiny random transformers BlipForImageTextRetrieval saved to disk and
loaded through jaxdistill gives the same ITM logits (use_itm_head=True) and ITC cosine
similarities (use_itm_head=False), max abs diff <= 1e-4 in float32. ALBEF layout: the same
weights renamed to ALBEF's published key names load onto the same modules."""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest

from jaxdistill.pretrained import albef, blip
from jaxdistill.pretrained.checkpoint import read_state_dict
from jaxdistill.pretrained.registry import load_pretrained

import torch
import transformers

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
TEXT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=16, encoder_hidden_size=24)
VISION = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
              image_size=32, patch_size=8, layer_norm_eps=1e-6)  # ALBEF's ViT eps


def _random_blip(directory):
  """Tiny BlipForImageTextRetrieval with every parameter drawn at random, saved to directory."""
  torch.manual_seed(0)
  config = transformers.BlipConfig(text_config=TEXT, vision_config=VISION,
                                   image_text_hidden_size=16)
  model = transformers.BlipForImageTextRetrieval(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.save_pretrained(directory)
  return model


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW for torch
  ids = rng.integers(0, TEXT["vocab_size"], (3, 7))
  mask = np.ones((3, 7), np.int64)
  mask[1, 4:] = 0
  return images, ids, mask


def _torch_scores(model, images, ids, mask):
  """(ITM logits [B, 2] of the pairs, ITC similarities [B images, B texts])."""
  args = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images),
              attention_mask=torch.tensor(mask))
  with torch.no_grad():
    return (model(**args, use_itm_head=True).itm_score.numpy(),
            model(**args, use_itm_head=False).itm_score.numpy())


def _jax_scores(module, params, images, ids, mask):
  logits, image_embed, text_embed = module.apply({"params": params}, images.transpose(0, 2, 3, 1),
                                                 ids, mask)
  return np.asarray(logits), np.asarray(image_embed @ text_embed.T)


def test_blip_itm_and_itc_match_torch(tmp_path):
  model = _random_blip(tmp_path)
  module, params, _ = load_pretrained(str(tmp_path))
  assert isinstance(module, blip.BlipRetrieval)
  images, ids, mask = _inputs()
  want_itm, want_itc = _torch_scores(model, images, ids, mask)
  got_itm, got_itc = _jax_scores(module, params, images, ids, mask)
  assert np.abs(got_itm - want_itm).max() <= TOL
  assert np.abs(got_itc - want_itc).max() <= TOL
  assert np.ptp(want_itc, axis=0).min() > 1e-2  # the images differ: the vision tower is exercised
  tokens = module.apply({"params": params}, images.transpose(0, 2, 3, 1),
                        method=blip.BlipRetrieval.image_tokens)
  score = module.apply({"params": params}, tokens, ids, mask,
                       method=blip.BlipRetrieval.itm_score)
  np.testing.assert_allclose(score, jax.nn.softmax(want_itm)[:, 1], atol=TOL)


def _to_albef(state):
  """BLIP-layout state dict -> ALBEF's published layout (ALBEF_model.pth['model'], pre-training
  checkpoint: text_encoder.bert.*): invert albef.TO_BLIP key by key; drop layer 0's
  cross-attention (fusion_layer = 1); add a zero token-type table (adds nothing), momentum
  copies, queues, temp and an MLM head bias, all of which the loader must drop."""
  inverse = (
      (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
      (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
      (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
      (r"^vision_model\.encoder\.layers\.", "visual_encoder.blocks."),
      (r"^(visual_encoder\.blocks\.\d+)\.layer_norm(1|2)\.", r"\1.norm\2."),
      (r"^(visual_encoder\.blocks\.\d+)\.self_attn\.qkv\.", r"\1.attn.qkv."),
      (r"^(visual_encoder\.blocks\.\d+)\.self_attn\.projection\.", r"\1.attn.proj."),
      (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
      (r"^text_encoder\.", "text_encoder.bert."),
  )
  rename = lambda rules, key: functools.reduce(lambda k, r: re.sub(*r, k), rules, key)
  out = {}
  for key, value in state.items():
    if key.startswith("text_encoder.encoder.layer.0.crossattention."):
      continue
    albef_key = rename(inverse, key)
    assert rename(albef.TO_BLIP, albef_key) == key  # the inverse is exact
    out[albef_key] = torch.from_numpy(np.array(value))
  width = TEXT["hidden_size"]
  out["text_encoder.bert.embeddings.token_type_embeddings.weight"] = torch.zeros(2, width)
  out["visual_encoder_m.cls_token"] = out["visual_encoder.cls_token"].clone()
  out["text_proj_m.weight"] = out["text_proj.weight"].clone()
  out["image_queue"] = torch.zeros(16, 8)
  out["queue_ptr"] = torch.zeros(1, dtype=torch.long)
  out["temp"] = torch.tensor(0.07)
  out["text_encoder.cls.predictions.bias"] = torch.zeros(TEXT["vocab_size"])
  return out


class _SkipCrossAttention(torch.nn.Module):
  """Stands in for a BlipTextLayer's crossattention: returns its input (no fusion)."""

  def forward(self, hidden_states, *args, **kwargs):
    return (hidden_states,)


def test_albef_layout_matches_blip_with_fusion_from_layer_1(tmp_path):
  model = _random_blip(tmp_path / "blip")
  state = read_state_dict(str(tmp_path / "blip"))
  torch.save({"model": _to_albef(state), "epoch": 0}, tmp_path / "albef.pth")
  module, params, _ = load_pretrained(str(tmp_path / "albef.pth"), architecture="albef",
                                      text_heads=TEXT["num_attention_heads"],
                                      vision_heads=VISION["num_attention_heads"])
  assert module.text_encoder.fusion_layer == 1 and module.text_layers == 1
  assert module.text_encoder.type_vocab_size == 2

  _, blip_params, _ = load_pretrained(str(tmp_path / "blip"))
  flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  albef_flat, blip_flat = flat(params), flat(blip_params)
  dropped = {k for k in blip_flat if "layer_0']['crossattention" in k}
  assert dropped and set(blip_flat) - dropped <= set(albef_flat)
  for key in set(blip_flat) - dropped:
    np.testing.assert_array_equal(albef_flat[key], blip_flat[key])

  # Reference: the torch BLIP model with layer 0's cross-attention skipped is ALBEF's
  # multimodal encoder with fusion_layer = 1; its unimodal text mode runs layer 0 only.
  model.text_encoder.encoder.layer[0].crossattention = _SkipCrossAttention()
  images, ids, mask = _inputs()
  want_itm, _ = _torch_scores(model, images, ids, mask)
  model.text_encoder.encoder.layer = model.text_encoder.encoder.layer[:1]
  model.text_encoder.encoder.config.num_hidden_layers = 1
  _, want_itc = _torch_scores(model, images, ids, mask)
  got_itm, got_itc = _jax_scores(module, params, images, ids, mask)
  assert np.abs(got_itm - want_itm).max() <= TOL
  assert np.abs(got_itc - want_itc).max() <= TOL
  blip_itm, blip_itc = _jax_scores(blip.build(TEXT, VISION, 16), blip_params, images, ids, mask)
  assert np.abs(blip_itm - got_itm).max() > 1e-3  # fusion_layer and text_layers matter
  assert np.abs(blip_itc - got_itc).max() > 1e-3
