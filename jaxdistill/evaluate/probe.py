"""Linear probe of an image network on Fashion-MNIST classes: did self-supervised pretraining
learn anything? (docs/ssl_vit.md)

Input: each Fashion-MNIST image alone in the top-left cell of an otherwise empty 2x2 grid,
normalised as the benchmark (data/ssl_grids.probe_grids). Features: for each network, its
L2-normalised [CLS] ("cls") and the token of the top-left cell ("cell", token 1); raw pixels
(the whole normalised grid, flattened) as a baseline. Classifier: multinomial logistic
regression on standardised features (train mean / std), full batch, L-BFGS (optax) for a fixed
number of steps, with an L2 penalty chosen from `L2_GRID` on a held-out fifth of the probe's
train images, then refit on all of them. Fit on `num_train` train images (a seeded sample of
the 60,000), accuracy on the first `num_test` test images. Beside it, DINO's weighted k-NN
classifier (Caron et al. 2021, §4.1: cosine similarity of L2-normalised features, the k = 20
nearest train images vote with weight exp(sim / 0.07)): the geometry a contrastive or
cosine distillation reads, which a linear classifier does not see.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdistill.data.fashion_mnist import NUM_CLASSES, FashionMnist
from jaxdistill.data.ssl_grids import probe_grids

L2_GRID = (1e-4, 1e-3, 1e-2)
KNN_K, KNN_TEMPERATURE = 20, 0.07


def _fit(x: jax.Array, y: jax.Array, weight: jax.Array, l2: jax.Array,
         steps: int) -> tuple[jax.Array, jax.Array]:
  """Multinomial logistic regression: argmin of the weight-averaged CE(x W + b, y) +
  l2 / 2 ||W||^2 by L-BFGS (weight 0 leaves a row out: one compiled fit per feature width)."""
  def objective(params):
    logits = x @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(weight * ce) / jnp.sum(weight) + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  params = {"w": jnp.zeros((x.shape[1], NUM_CLASSES), jnp.float32),
            "b": jnp.zeros((NUM_CLASSES,), jnp.float32)}
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params["w"], params["b"]


_fit_jit = jax.jit(_fit, static_argnames="steps")


def _accuracy(x, y, w, b) -> float:
  return float(jnp.mean(jnp.argmax(x @ w + b, axis=-1) == y))


def logistic_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, steps: int = 300, seed: int = 0) -> dict:
  """Test accuracy of a linear classifier on features [N, F] (see the module docstring).
  Returns {"test_accuracy", "train_accuracy", "l2"}."""
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  standard = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
  x, y = standard(train_x), jnp.asarray(train_y, jnp.int32)
  held = np.zeros(len(x), bool)
  held[np.random.default_rng(seed).permutation(len(x))[:len(x) // 5]] = True
  fit_only = jnp.asarray(~held, jnp.float32)
  scores = [_accuracy(x[held], y[held], *_fit_jit(x, y, fit_only, jnp.float32(l2), steps))
            for l2 in L2_GRID]
  l2 = L2_GRID[int(np.argmax(scores))]
  w, b = _fit_jit(x, y, jnp.ones(len(x), jnp.float32), jnp.float32(l2), steps)
  return {"test_accuracy": _accuracy(standard(test_x), jnp.asarray(test_y, jnp.int32), w, b),
          "train_accuracy": _accuracy(x, y, w, b), "l2": l2}


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                 chunk: int = 1000) -> float:
  """Weighted k-NN accuracy (DINO's eval_knn) on L2-normalised features [N, F]."""
  unit = lambda x: jnp.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12),
                               jnp.float32)
  train, labels = unit(train_x), jax.nn.one_hot(jnp.asarray(train_y, jnp.int32), NUM_CLASSES)

  @jax.jit
  def predict(queries):
    sims, index = jax.lax.top_k(queries @ train.T, k)
    votes = jnp.einsum("qk,qkc->qc", jnp.exp(sims / temperature), labels[index])
    return jnp.argmax(votes, axis=-1)

  test = unit(test_x)
  predictions = np.concatenate([np.asarray(predict(test[i:i + chunk]))
                                for i in range(0, len(test), chunk)])
  return float(np.mean(predictions == np.asarray(test_y)))


def embed(fn: Callable, params, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """fn(params, images [b, ...]) -> {name: [b, F]} (jitted) over all images in batches of
  batch_size (the last one padded, so fn compiles once); host arrays [N, F]."""
  chunks: dict[str, list] = {}
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    for name, value in jax.device_get(fn(params, chunk)).items():
      chunks.setdefault(name, []).append(np.asarray(value[:len(chunk) - pad], np.float32))
  return {name: np.concatenate(parts) for name, parts in chunks.items()}


def linear_probe(extractors: Mapping[str, tuple[Callable, object]], data: FashionMnist, *,
                 num_train: int,
                 num_test: int, steps: int, batch_size: int, seed: int = 0) -> dict:
  """Probe accuracies of each extractor's features and of raw pixels.

  extractors: {model name: (fn(params, images float32 [b, 56, 56, 1]) -> {feature name:
  [b, F]}, params)}.
  Returns {"num_train", "num_test", "steps", "accuracy": {"<model>/<feature>" | "pixels":
  {"test_accuracy", "train_accuracy", "l2", "knn_accuracy"}}}."""
  rng = np.random.default_rng(seed)
  train_index = np.sort(rng.choice(len(data.train_images), num_train, replace=False))
  train_images = probe_grids(data.train_images[train_index])
  test_images = probe_grids(data.test_images[:num_test])
  train_y, test_y = data.train_labels[train_index], data.test_labels[:num_test]
  flat = lambda x: x.reshape(len(x), -1)
  features = {"pixels": (flat(train_images), flat(test_images))}
  jitted = {}
  for model, (fn, params) in extractors.items():
    fn = jitted.setdefault(fn, jax.jit(fn))   # one compilation per function
    train_features = embed(fn, params, train_images, batch_size)
    test_features = embed(fn, params, test_images, batch_size)
    for feature, values in train_features.items():
      features[f"{model}/{feature}"] = (values, test_features[feature])
  results = {}
  for name, (train_x, test_x) in features.items():
    results[name] = logistic_probe(train_x, train_y, test_x, test_y, steps, seed)
    results[name]["knn_accuracy"] = knn_accuracy(train_x, train_y, test_x, test_y)
  return {"num_train": num_train, "num_test": num_test, "steps": steps, "accuracy": results}


def format_probe(report: dict) -> str:
  """The probe's accuracies as aligned text lines."""
  rows = report["accuracy"]
  width = max((len(name) for name in rows), default=0)
  return "\n".join(f"{name:<{width}}  linear test {r['test_accuracy']:.4f} (train "
                   f"{r['train_accuracy']:.4f}, l2 {r['l2']:g})  {KNN_K}-NN test "
                   f"{r['knn_accuracy']:.4f}" for name, r in rows.items())
