"""The binding probe: does a model prefer an image's true caption over a minimally edited one?

Owns the probe's accuracy. Each image has its true caption and a false caption with the same
words, describing the image's layout with two cells swapped (`data/compositional.py`): only a
model that binds items to positions can tell them apart, so chance is 50%.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def binding_accuracy(true_scores: Any, false_scores: Any) -> float:
  """Percent of images whose true caption scores strictly higher than its false caption.

  true_scores, false_scores: [N] scores of each image with its true / false caption (dual
  similarity or cross-encoder logit). Ties and NaNs count as wrong, so a constant scorer gets 0%.
  """
  true_scores, false_scores = np.asarray(true_scores), np.asarray(false_scores)
  if true_scores.ndim != 1 or true_scores.shape != false_scores.shape or true_scores.size == 0:
    raise ValueError(f"binding_accuracy needs true_scores and false_scores of the same non-empty "
                     f"shape [N]; got {true_scores.shape} and {false_scores.shape}")
  return float(100.0 * np.mean(true_scores > false_scores))
