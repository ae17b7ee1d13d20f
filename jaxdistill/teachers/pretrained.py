"""Teachers from published checkpoints, through jaxdistill/pretrained (`load_pretrained`):
CLIP (dual teacher: MCAD's dual-stream teacher, paper 001) and BLIP / ALBEF retrieval models
(dual + cross teacher: their ITC towers and ITM head, papers 001-002).

Images must already be at the checkpoint's resolution and normalisation (e.g. 224 x 224 RGB,
CLIP-normalised); texts are tokenized with the checkpoint's own tokenizer.json when it has one.
"""

from __future__ import annotations

import os

import numpy as np
import tokenizers

from jaxdistill.pretrained import blip, clip
from jaxdistill.pretrained.registry import load_pretrained
from jaxdistill.teachers.base import Teacher, cast_params, encode_padded, make_teacher

MAX_LEN = 64


def from_checkpoint(path: str, dtype: str = "float32", max_len: int = MAX_LEN) -> Teacher:
  """A CLIP (dual) or BLIP / ALBEF retrieval (dual + cross) checkpoint as a frozen Teacher."""
  module, params, _ = load_pretrained(path)
  params = cast_params(params, dtype)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  tokenizer_file = os.path.join(directory, "tokenizer.json")
  tokenize = None
  if os.path.exists(tokenizer_file):
    tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
    tokenize = lambda texts: encode_padded(tokenizer, texts, max_len)
  name = f"pretrained:{os.path.basename(os.path.normpath(path))}"
  if isinstance(module, clip.CLIP):
    return make_teacher(name, params,
                        embed_images=lambda p, x: clip.embed_images(module, p, x),
                        embed_texts=lambda p, i, m: clip.embed_texts(module, p, i, m),
                        temperature=float(np.exp(-np.asarray(params["logit_scale"], np.float32))),
                        tokenize=tokenize)
  if isinstance(module, blip.BlipRetrieval):
    apply = lambda p, method, *args: module.apply({"params": p}, *args, method=method)
    return make_teacher(
        name, params,
        embed_images=lambda p, x: apply(p, blip.BlipRetrieval.image_embed,
                                        apply(p, blip.BlipRetrieval.image_tokens, x)),
        embed_texts=lambda p, i, m: apply(p, blip.BlipRetrieval.text_embed, i, m),
        # ITM logits [P, 2], index 1 = match (BLIP / ALBEF heads)
        match_scores=lambda p, x, i, m: apply(p, blip.BlipRetrieval.itm_logits,
                                              apply(p, blip.BlipRetrieval.image_tokens, x), i, m)[:, 1],
        tokenize=tokenize)
  raise ValueError(f"{path} loads as a {type(module).__name__}; a teacher needs a CLIP or a "
                   "BLIP / ALBEF retrieval checkpoint (--config.teachers.<name>.kind=pretrained)")
