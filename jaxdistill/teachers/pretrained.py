"""Teachers from published checkpoints, through jaxdistill/pretrained (`load_pretrained`):
CLIP (dual teacher: MCAD's dual-stream teacher, paper 001), BLIP / ALBEF retrieval models
(dual + cross teacher: their ITC towers and ITM head, papers 001-002) and ViT / BEiT /
data2vec-vision encoders (image-only teacher: the L2-normalised [CLS] after the final LayerNorm
when the checkpoint has one, paper 004's [I_CLS]; embed_texts None).

Images must already be at the checkpoint's resolution and normalisation (e.g. 224 x 224 RGB,
CLIP-normalised); texts are tokenized with the checkpoint's own tokenizer.json when it has one.
Only the image-only teacher also reads benchmark images: images of another size or channel
count than its checkpoint's are taken as normalised as data/compositional.py does and adapted
as the "hf_vit" student tower adapts them (models/towers.py adapt_images: un-normalise, resize,
grey -> RGB, the checkpoint's normalisation from its preprocessor_config.json).
"""

from __future__ import annotations

import os

import numpy as np
import tokenizers

from jaxdistill.data.compositional import IMAGE_MEAN, IMAGE_STD
from jaxdistill.models.dual import l2_normalize
from jaxdistill.models.hf_vit import ImageEncoder
from jaxdistill.models.towers import adapt_images
from jaxdistill.pretrained import blip, clip, vit
from jaxdistill.pretrained.registry import load_pretrained
from jaxdistill.teachers.base import Teacher, cast_params, encode_padded, make_teacher

MAX_LEN = 64


def _log_odds(itm_logits):
  """BLIP / ALBEF ITM logits [P, 2] (index 1 = match) -> log P(match) / P(no match) [P]."""
  return itm_logits[:, 1] - itm_logits[:, 0]


def from_checkpoint(path: str, dtype: str = "float32", max_len: int = MAX_LEN) -> Teacher:
  """A CLIP (dual), BLIP / ALBEF retrieval (dual + cross) or ViT / BEiT / data2vec-vision
  (image-only) checkpoint as a frozen Teacher."""
  module, params, config = load_pretrained(path)
  params = cast_params(params, dtype)
  name = f"pretrained:{os.path.basename(os.path.normpath(path))}"
  if isinstance(module, ImageEncoder):
    channels = config.get("num_channels", 3)
    mean, std = vit.image_normalization(path, channels)
    return make_teacher(name, params,
                        embed_images=image_encoder_embed(module, channels, mean, std))
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  tokenizer_file = os.path.join(directory, "tokenizer.json")
  tokenize = None
  if os.path.exists(tokenizer_file):
    tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
    positions = config.get("text_config", config).get("max_position_embeddings", max_len)
    length = min(max_len, positions)   # CLIP: 77 positions
    tokenize = lambda texts: encode_padded(tokenizer, texts, length)
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
        # ITM logits [P, 2], index 1 = match (BLIP / ALBEF heads): the log-odds of a match
        match_scores=lambda p, x, i, m: _log_odds(apply(p, blip.BlipRetrieval.itm_logits,
                                                        apply(p, blip.BlipRetrieval.image_tokens, x),
                                                        i, m)),
        tokenize=tokenize)
  raise ValueError(f"{path} loads as a {type(module).__name__}; a teacher needs a CLIP, a "
                   "BLIP / ALBEF retrieval or a ViT / BEiT / data2vec-vision checkpoint "
                   "(--config.teachers.<name>.kind=pretrained)")


def image_encoder_embed(module: ImageEncoder, channels: int, mean, std):
  """embed_images(params, images [B, H, W, C]) -> [B, D]: the L2-normalised [CLS] token of
  `module`'s tokens (after its final LayerNorm when it has one). Images of the checkpoint's
  size and `channels` go in as they are (normalised with its mean / std); any other shape is a
  benchmark image (data/compositional.py's IMAGE_MEAN / IMAGE_STD), adapted first."""
  size = module.image_size

  def embed(params, images):
    if images.shape[1:] != (size, size, channels):
      images = adapt_images(images, IMAGE_MEAN, IMAGE_STD, size, channels, mean, std)
    return l2_normalize(module.apply({"params": params}, images)[0][:, 0].astype("float32"))

  return embed
