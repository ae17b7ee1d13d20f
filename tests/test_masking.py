"""BERT-style masking for L_mlm."""

import jax
import numpy as np

from jaxdistill.data.masking import FIRST_WORD_ID, mask_tokens
from jaxdistill.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID


def test_mask_tokens_statistics_and_specials():
  rng = np.random.default_rng(0)
  b, l, vocab = 256, 16, 50
  ids = rng.integers(FIRST_WORD_ID, vocab, (b, l)).astype(np.int32)
  ids[:, 0], ids[:, 11] = CLS_ID, SEP_ID
  ids[:, 12:] = PAD_ID
  mask = (ids != PAD_ID).astype(np.int32)
  masked, labels, weights = jax.device_get(
      mask_tokens(ids, mask, jax.random.PRNGKey(0), probability=0.15, vocab_size=vocab))
  np.testing.assert_array_equal(labels, ids)
  selected = weights > 0
  assert not selected[:, [0, 11]].any() and not selected[:, 12:].any()
  rate = selected[:, 1:11].mean()
  assert 0.12 < rate < 0.18, rate
  np.testing.assert_array_equal(masked[~selected], ids[~selected])
  share_mask = (masked[selected] == MASK_ID).mean()
  assert 0.72 < share_mask < 0.88, share_mask
  assert ((masked >= FIRST_WORD_ID) | (masked == MASK_ID) | ~selected).all()
