"""Test set-up: 8 simulated CPU devices, so sharded code runs on a real 8-device mesh.

The flag must be set before jax is imported anywhere.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA programs compiled in one test process are kept on disk for the others: the two xdist
# workers and every `python -m jaxdistill.main` a test starts (they inherit the environment)
# compile many of the same tiny-preset steps. A hit loads the same executable a compile would
# give (same HLO, options and devices make the key), so numbers do not change.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


def recipe_config(name: str, preset: str = "tiny"):
  """configs/<name>.py:<preset> loaded as --config= loads it (no sys.path edits)."""
  from jaxdistill.config import load_config_file
  return load_config_file(os.path.join(REPO, "configs", f"{name}.py:{preset}"))


@pytest.fixture
def config_of():
  """config_of("loopitr", "tiny") -> configs/loopitr.py's tiny config."""
  return recipe_config


# --- recipe-loss harness (tests/test_loopitr.py, test_cprd.py, test_dual_recipe.py) -------------

import typing  # noqa: E402


def random_captions(rng, n: int, length: int = 12, min_len: int = 4, bracket: bool = False):
  """n random padded captions of the tiny preset from the numpy Generator `rng` (draws ids,
  then lengths): ids int32 [n, length] in [5, 40), 0 past each caption's length (drawn in
  [min_len, length)), and mask int32 [n, length]. bracket: [CLS]=2 first and [SEP]=3 last, as
  the tokenizer writes."""
  import numpy as np
  ids = rng.integers(5, 40, (n, length)).astype(np.int32)
  lengths = rng.integers(min_len, length, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, 0).astype(np.int32)
  if bracket:
    ids[:, 0], ids[np.arange(n), lengths - 1] = 2, 3
  return ids, mask


def random_pairs(rng, n: int, length: int = 12, min_len: int = 4, bracket: bool = False,
                 image_shape=(56, 56, 1)) -> dict:
  """n random (image, caption) rows: `random_captions` as text_ids / text_mask, then image
  float32 [n, *image_shape] (standard normal)."""
  ids, mask = random_captions(rng, n, length, min_len, bracket)
  image = rng.normal(size=(n, *image_shape)).astype("float32")
  return {"image": image, "text_ids": ids, "text_mask": mask}


def one_device_mesh():
  """The (data, fsdp) mesh over the first simulated device only."""
  import jax
  from jaxdistill.parallel.mesh import make_mesh
  return make_mesh(devices=jax.devices()[:1])


class LossGrads(typing.NamedTuple):
  """Host copies of one loss evaluation: loss [], metrics {name: []}, grads (like params),
  extra (the recipe's carry after the step)."""
  loss: typing.Any
  metrics: dict
  grads: typing.Any
  extra: typing.Any


def loss_and_grads(loss_fn, mesh, params, batch, frozen=None, extra=None, step=0, seed=0):
  """Runs the contract loss `loss_fn(params, frozen, extra, batch, rng, step)` under
  jit(value_and_grad) on `mesh` as the train step does: batch sharded over the batch axes,
  params / frozen / extra replicated, rng = PRNGKey(seed). Returns a LossGrads on the host."""
  import jax
  import jax.numpy as jnp
  from jaxdistill.parallel.mesh import batch_sharding, replicated

  def objective(p, f, e, b, r, s):
    loss, metrics, e = loss_fn(p, f, e, b, r, s)
    return loss, (metrics, e)

  rep = replicated(mesh)
  fn = jax.jit(jax.value_and_grad(objective, has_aux=True),
               in_shardings=(rep, rep, rep, batch_sharding(mesh), rep, rep))
  (loss, (metrics, extra)), grads = fn(params, frozen or {}, extra or {}, batch,
                                       jax.random.PRNGKey(seed), jnp.asarray(step, jnp.int32))
  return LossGrads(*jax.device_get((loss, metrics, grads, extra)))


def assert_devices_agree(many: LossGrads, one: LossGrads, loss_atol: float = 1e-5) -> None:
  """The n-device evaluation equals the 1-device one: loss (rtol 1e-5, loss_atol), every metric
  (1e-5), and every gradient at rtol 1e-5 with atol 1e-5 times that parameter's largest
  gradient (the batch sums are reduced across devices in another order: float32 noise)."""
  import jax
  import numpy as np
  np.testing.assert_allclose(many.loss, one.loss, rtol=1e-5, atol=loss_atol)
  assert set(many.metrics) == set(one.metrics)
  for k in one.metrics:
    np.testing.assert_allclose(many.metrics[k], one.metrics[k], rtol=1e-5, atol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max()))), many.grads, one.grads)


def user_env() -> dict:
  """The environment of a user's `python -m jaxdistill.main` run: CPU, one device."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def logged_losses(workdir: str) -> dict:
  """step -> loss from <workdir>/metrics.jsonl (one line per logged step, also after a resume)."""
  import json
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      losses[record["step"]] = record["loss"]
  return losses


def check_finite_differences(fn, args, grads, eps: float = 1e-6, atol: float = 1e-8) -> None:
  """Central differences of the scalar fn (float64: call under jax.enable_x64) w.r.t. each of
  args against `grads` (one per arg), to rtol 1e-6."""
  import jax.numpy as jnp
  import numpy as np
  args = [np.asarray(a, np.float64) for a in args]
  for index, grad in enumerate(grads):
    flat = args[index].reshape(-1)
    numeric = np.zeros_like(flat)
    for k in range(flat.size):
      plus, minus = flat.copy(), flat.copy()
      plus[k] += eps
      minus[k] -= eps
      args_p, args_m = list(args), list(args)
      args_p[index] = plus.reshape(args[index].shape)
      args_m[index] = minus.reshape(args[index].shape)
      numeric[k] = (float(fn(*map(jnp.asarray, args_p)))
                    - float(fn(*map(jnp.asarray, args_m)))) / (2 * eps)
    np.testing.assert_allclose(np.reshape(grad, -1), numeric, rtol=1e-6, atol=atol,
                               err_msg=f"argument {index}")
