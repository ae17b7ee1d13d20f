"""Parity of an export with the JAX towers on held-out inputs (run at the end of every export).

Through the exported files only (`jaxdistill.search.Exported`: uint8 images normalised as the
manifest says, ids / mask into the text model) vs the JAX towers on the same inputs:
  - per-example cosine between the two embeddings, min and mean, per tower;
  - text->image and image->text R@1 (and t2i R@10) of each on the inputs (evaluate/retrieval.py
    protocol).
Bars (min cosine over every example): none 0.9999, float16 0.999, int8 0.99, int8_full 0.95
(per-tensor int8 activations: 0.977-0.999 on the mobile student, every broken export < 0.9;
docs/export.md); for int8 and int8_full also |t2i R@1 (TFLite) - t2i R@1 (JAX)| <= 1 point.
"""

from __future__ import annotations

import numpy as np

from jaxdistill.evaluate.retrieval import recall_at_k
from jaxdistill.export import ExportError
from jaxdistill.search import Exported

COSINE_MIN = {"none": 0.9999, "float16": 0.999, "int8": 0.99, "int8_full": 0.95}
T2I_R1_MAX_GAP = {"int8": 1.0, "int8_full": 1.0}   # points


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine [N, E], [N, E] -> [N] (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1),
                                        1e-30)


def measure(exported: Exported, quantization: str, images: np.ndarray, ids: np.ndarray,
            mask: np.ndarray, caption_to_image: np.ndarray, jax_image: np.ndarray,
            jax_text: np.ndarray) -> dict:
  """images uint8 [N, H, W(, C)], ids / mask int32 [T, L], caption_to_image int [T];
  jax_image [N, E], jax_text [T, E]: the JAX towers' embeddings of the same inputs.
  Returns the figures, the bars and "passed"."""
  tfl_image = exported.embed_images(images)
  tfl_text = exported.text(ids=ids, mask=mask)
  cos_image, cos_text = cosine(tfl_image, jax_image), cosine(tfl_text, jax_text)
  jax_r = recall_at_k(jax_image @ jax_text.T, caption_to_image, ks=(1, 10))
  tfl_r = recall_at_k(tfl_image @ tfl_text.T, caption_to_image, ks=(1, 10))
  result = {
      "quantization": quantization, "num_images": len(images), "num_texts": len(ids),
      "image_cosine_min": float(cos_image.min()), "image_cosine_mean": float(cos_image.mean()),
      "text_cosine_min": float(cos_text.min()), "text_cosine_mean": float(cos_text.mean()),
      "t2i_r1_jax": float(jax_r["t2i_r1"]), "t2i_r1_tflite": float(tfl_r["t2i_r1"]),
      "i2t_r1_jax": float(jax_r["i2t_r1"]), "i2t_r1_tflite": float(tfl_r["i2t_r1"]),
      "t2i_r10_jax": float(jax_r["t2i_r10"]), "t2i_r10_tflite": float(tfl_r["t2i_r10"]),
      "cosine_min_bar": COSINE_MIN[quantization],
      "t2i_r1_max_gap": T2I_R1_MAX_GAP.get(quantization),
  }
  result["passed"] = not failures(result)
  return result


def failures(result: dict) -> list[str]:
  """The bars `result` misses, in words (empty when it passes)."""
  bar, missed = result["cosine_min_bar"], []
  for tower in ("image", "text"):
    if result[f"{tower}_cosine_min"] < bar:
      missed.append(f"{tower} cosine min {result[f'{tower}_cosine_min']:.6f} < {bar}")
  gap = abs(result["t2i_r1_tflite"] - result["t2i_r1_jax"])
  if result["t2i_r1_max_gap"] is not None and gap > result["t2i_r1_max_gap"]:
    missed.append(f"t2i R@1 {result['t2i_r1_tflite']:.2f} vs JAX {result['t2i_r1_jax']:.2f} "
                  f"(gap {gap:.2f} > {result['t2i_r1_max_gap']} points)")
  return missed


def check(result: dict) -> None:
  """Raises ExportError naming each missed bar."""
  missed = failures(result)
  if missed:
    raise ExportError(f"{result['quantization']} export fails parity: {'; '.join(missed)}; use a "
                      "less aggressive --config.export.quantization (int8 -> float16 -> none)")


def format_result(result: dict) -> str:
  """One line per tower, and R@1, for the console."""
  return (f"parity ({result['quantization']}, {result['num_images']} images, "
          f"{result['num_texts']} texts): cosine min/mean image "
          f"{result['image_cosine_min']:.6f}/{result['image_cosine_mean']:.6f}, text "
          f"{result['text_cosine_min']:.6f}/{result['text_cosine_mean']:.6f} (bar "
          f"{result['cosine_min_bar']}); t2i R@1 TFLite {result['t2i_r1_tflite']:.2f} vs JAX "
          f"{result['t2i_r1_jax']:.2f}; i2t R@1 {result['i2t_r1_tflite']:.2f} vs "
          f"{result['i2t_r1_jax']:.2f} -> {'passed' if result['passed'] else 'FAILED'}")
