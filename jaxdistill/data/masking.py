"""BERT-style token masking for L_mlm, as a pure jnp function that runs inside the train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdistill.data.tokenizer import SpecialIds

FIRST_WORD_ID = SpecialIds().first_word  # the built vocabulary: special tokens come first


def mask_tokens(ids: jax.Array, mask: jax.Array, key: jax.Array, *, probability: float,
                vocab_size: int, special: SpecialIds = SpecialIds()
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Selects each real word token with `probability` (never [CLS]/[SEP]/[PAD]); of the selected,
  80% become [MASK], 10% a random token in [special.first_word, vocab_size), 10% stay (BERT,
  Devlin et al. 2019 §3.1). special: the vocabulary's ids (tokenizer.special_ids; default: the
  vocabulary build_tokenizer makes).

  ids, mask: int32 [B, L]. Returns (masked_ids [B, L], labels [B, L] = original ids,
  weights float32 [B, L] = 1 on selected positions)."""
  k_select, k_kind, k_random = jax.random.split(key, 3)
  maskable = (mask > 0) & (ids != special.cls) & (ids != special.sep) & (ids != special.pad)
  selected = maskable & (jax.random.uniform(k_select, ids.shape) < probability)
  kind = jax.random.uniform(k_kind, ids.shape)
  random_ids = jax.random.randint(k_random, ids.shape, special.first_word, vocab_size)
  replaced = jnp.where(kind < 0.8, special.mask, jnp.where(kind < 0.9, random_ids, ids))
  masked_ids = jnp.where(selected, replaced, ids).astype(ids.dtype)
  return masked_ids, ids, selected.astype(jnp.float32)
