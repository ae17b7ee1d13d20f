"""What the benchmarks share: the trainer's step built as train/loop.py builds it, synthetic and
abstract batches of a config's shapes, and the machine's name for the records."""

from __future__ import annotations

import platform
import types


def trainer(config, mesh, batch_spec, data=None) -> tuple:
  """(recipe, built) as the trainer makes them: methods.build, then train/loop.py build_state
  (built["step"] is the jitted train step). data: what the recipe reads from the dataset; by
  default only the tokenizer's special ids (LoopITR's MLM masking)."""
  from jaxdistill import methods
  from jaxdistill.data.tokenizer import SpecialIds
  from jaxdistill.train.loop import build_state
  if data is None:
    data = types.SimpleNamespace(special_ids=SpecialIds())
  recipe = methods.build(config, mesh, data, steps_per_epoch=100)
  return recipe, build_state(recipe, config, mesh, batch_spec)


def synthetic_batch(config, seed: int = 0) -> dict:
  """A host train batch of config.batch_size rows: random images float32 [B, H, W, C], token ids
  [B, L] starting with [CLS] (mask of ones: every token real), image_id [B]."""
  import numpy as np
  from jaxdistill.data.tokenizer import SpecialIds
  b, mc = config.batch_size, config.model
  rng = np.random.default_rng(seed)
  ids = rng.integers(SpecialIds().first_word, mc.vocab_size, (b, mc.max_len)).astype(np.int32)
  ids[:, 0] = SpecialIds().cls
  return {"image": rng.normal(size=(b, mc.image_size, mc.image_size, mc.channels)
                              ).astype(np.float32),
          "text_ids": ids, "text_mask": np.ones((b, mc.max_len), np.int32),
          "image_id": np.arange(b, dtype=np.int32)}


def abstract_batch(config) -> dict:
  """`synthetic_batch`'s shapes as ShapeDtypeStructs (nothing is allocated)."""
  import jax
  import jax.numpy as jnp
  b, mc = config.batch_size, config.model
  return {"image": jax.ShapeDtypeStruct((b, mc.image_size, mc.image_size, mc.channels),
                                        jnp.float32),
          "text_ids": jax.ShapeDtypeStruct((b, mc.max_len), jnp.int32),
          "text_mask": jax.ShapeDtypeStruct((b, mc.max_len), jnp.int32),
          "image_id": jax.ShapeDtypeStruct((b,), jnp.int32)}


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()
