"""A teacher: frozen params + pure apply functions (papers 001 MCAD, 002 CPRD, 003 LoopITR).

Every apply function takes the params first and is wrapped by `frozen`, which puts the params
behind `jax.lax.stop_gradient`: a loss differentiated through a teacher never produces a
gradient for its params, whatever the caller passes (tests/test_teachers.py checks this).

  embed_images(params, images [B,H,W,C] float32) -> [B,E] float32, L2-normalised
  embed_texts(params, ids [B,L] int32, mask [B,L] int32) -> [B,E] float32, L2-normalised
  match_scores(params, images [P,H,W,C], ids [P,L], mask [P,L]) -> [P] float32
    (a cross encoder's ITM log-odds of a match, logit_match - logit_other, for the pairs
    (image p, text p): its sigmoid is P(match), the p in [0, 1] of paper 002 eq. 4)
  pair_outputs(params, images [B,H,W,C], ids [B,L], mask [B,L], image_index int32 [P],
    text_index int32 [P]) -> (P(match) [P], fused [CLS] feature [P, D]) float32: the cross
    encoder on P pairs (image image_index[p], text text_index[p]) of one batch, each image and
    text embedded once (MCAD's single-stream scores and H^SS, paper 001 eq. 6, 12)
  temperature: the dual towers' ITC temperature tau (a float), or None when unknown
  tokenize(texts: list[str]) -> (ids int32 [N,L], mask int32 [N,L]) in the teacher's own
    vocabulary, or None when the teacher reads the student's token ids.
  features: for a cached teacher (kind "cache", teachers/cache.py from_cache) the cache
    directory; its embeddings are not computed but read from batch fields <name>_image_emb,
    <name>_text_emb, <name>_valid, which the trainer adds (Recipe.batch_features).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jaxdistill.config import MODEL_DTYPES


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher; any of the three apply functions may be None (a dual teacher has no
  match_scores, a cross-only teacher no embeddings). Call as `t.embed_images(t.params, x)`."""
  name: str
  params: Any
  embed_images: Callable | None
  embed_texts: Callable | None
  match_scores: Callable | None
  tokenize: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None = None
  pair_outputs: Callable | None = None
  temperature: float | None = None
  features: str | None = None   # a teacher cache directory: embeddings come in the batch instead

  @property
  def is_dual(self) -> bool:
    return self.embed_images is not None and self.embed_texts is not None

  @property
  def is_cached(self) -> bool:
    return self.features is not None

  @property
  def is_cross(self) -> bool:
    return self.match_scores is not None


def frozen(fn: Callable | None) -> Callable | None:
  """jit of fn(params, *inputs) with params under stop_gradient and every output cast to
  float32 (inside another jit it is inlined into the caller's program)."""
  if fn is None:
    return None

  @functools.wraps(fn)
  def apply(params, *inputs):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                        fn(jax.lax.stop_gradient(params), *inputs))

  return jax.jit(apply)


def cast_params(params: Any, dtype: str) -> Any:
  """Floating-point leaves cast to `dtype` ("float32" | "bfloat16"); integer leaves kept.
  bfloat16 halves a teacher's memory (the apply functions still return float32)."""
  if dtype not in MODEL_DTYPES:
    raise ValueError(f"teacher dtype {dtype!r} is not valid: use one of {', '.join(MODEL_DTYPES)} "
                     "(--config.teachers.<name>.dtype)")
  target = jnp.dtype(dtype)
  return jax.tree.map(
      lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def make_teacher(name: str, params: Any, *, embed_images: Callable | None = None,
                 embed_texts: Callable | None = None, match_scores: Callable | None = None,
                 tokenize: Callable | None = None, pair_outputs: Callable | None = None,
                 temperature: float | None = None) -> Teacher:
  """A Teacher whose apply functions are all wrapped by `frozen` (stop_gradient, jitted)."""
  if embed_images is None and embed_texts is None and match_scores is None:
    raise ValueError(f"teacher {name!r} has no apply function: give embed_images + embed_texts "
                     "(dual) and/or match_scores (cross)")
  return Teacher(name=name, params=params, embed_images=frozen(embed_images),
                 embed_texts=frozen(embed_texts), match_scores=frozen(match_scores),
                 tokenize=tokenize, pair_outputs=frozen(pair_outputs),
                 temperature=None if temperature is None else float(temperature))


def pair_match_probability(teacher: Teacher, params: Any, images, ids, mask, image_index,
                           text_index) -> jax.Array:
  """P(match) [P] = softmax(ITM logits)[match] of the pairs (images[image_index[p]],
  ids / mask[text_index[p]]) of a cross teacher: through `pair_outputs` (each image and text
  embedded once) when it has one, otherwise the pairs gathered and the sigmoid of
  `match_scores` (the ITM log-odds). images [Bi,H,W,C], ids / mask [Bt,L], indices int [P]."""
  if teacher.pair_outputs is not None:
    return teacher.pair_outputs(params, images, ids, mask, image_index, text_index)[0]
  take = lambda x, index: jnp.take(jnp.asarray(x), index, axis=0)
  return jax.nn.sigmoid(teacher.match_scores(params, take(images, image_index),
                                             take(ids, text_index), take(mask, text_index)))


def encode_padded(tokenizer: tokenizers.Tokenizer, texts: list[str],
                  max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """A pretrained teacher's own tokenizer (its tokenizer.json: special tokens added, its padding
  and truncation settings ignored) -> ids int32 [N, max_len] padded with 0, mask int32 [N, max_len].
  A text longer than max_len raises (a truncated caption would be a different caption)."""
  tokenizer.no_padding()
  tokenizer.no_truncation()
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for row, encoding in enumerate(tokenizer.encode_batch(list(texts))):
    if len(encoding.ids) > max_len:
      raise ValueError(f"text {texts[row]!r} has {len(encoding.ids)} tokens > max_len={max_len}: "
                       "raise the teacher's max_len")
    ids[row, :len(encoding.ids)] = encoding.ids
    mask[row, :len(encoding.ids)] = 1
  return ids, mask
