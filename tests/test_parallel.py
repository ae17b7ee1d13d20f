"""Mesh construction and cross-device negatives: 8-device results equal the single-device ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from jaxdistill.losses.contrastive import contrastive_loss, similarity_logits
from jaxdistill.parallel.gather import gathered_contrastive_loss, gathered_similarity_logits
from jaxdistill.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated

B, D = 16, 4


def _embeddings(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, D)), jnp.float32))


def _single_device_loss(img, txt, tau):
  return contrastive_loss(*similarity_logits(img, txt, tau), jnp.arange(img.shape[0]))[0]


def test_make_mesh_shapes_and_axis_types():
  assert len(jax.devices()) == 8
  mesh = make_mesh()
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert dict(make_mesh(fsdp=2).shape) == {"data": 4, "fsdp": 2}
  assert dict(make_mesh(devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}
  assert batch_sharding(mesh).spec == PartitionSpec(BATCH_AXES)
  assert replicated(mesh).spec == PartitionSpec()


@pytest.mark.parametrize("data, fsdp, names", [(3, 1, "mesh.data"), (4, 3, "mesh.fsdp"),
                                               (8, 2, "mesh.data"), (0, 1, "mesh.data")])
def test_make_mesh_rejects_sizes_that_do_not_match_the_devices(data, fsdp, names):
  with pytest.raises(ValueError, match=names):
    make_mesh(data, fsdp)


@pytest.mark.parametrize("data, fsdp", [(8, 1), (2, 4)])
def test_gathered_logits_equal_single_device_and_are_row_sharded(data, fsdp):
  mesh = make_mesh(data, fsdp)
  img, txt = _embeddings(1)
  img, txt = jax.device_put((img, txt), batch_sharding(mesh))
  i2t, t2i = gathered_similarity_logits(mesh, img, txt, 0.25)
  expected = np.einsum("id,jd->ij", np.asarray(img), np.asarray(txt)) / 0.25
  np.testing.assert_allclose(i2t, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(t2i, expected.T, rtol=1e-5, atol=1e-5)
  for logits in (i2t, t2i):   # each device holds B / 8 full rows
    assert {s.data.shape for s in logits.addressable_shards} == {(B // 8, B)}


def test_jit_loss_and_gradients_equal_single_device():
  mesh = make_mesh()
  img, txt = _embeddings(2)
  tau = jnp.float32(0.3)
  grad_fn = jax.value_and_grad(lambda i, t, tau: gathered_contrastive_loss(mesh, i, t, tau)[0],
                               argnums=(0, 1, 2))
  data = batch_sharding(mesh)
  loss, grads = jax.jit(grad_fn, in_shardings=(data, data, replicated(mesh)))(img, txt, tau)
  ref_loss, ref_grads = jax.value_and_grad(_single_device_loss, argnums=(0, 1, 2))(img, txt, tau)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(grads[2])) > 1e-3   # the temperature gradient is summed over devices


def test_gradient_of_replicated_tower_params_equals_single_device():
  class Towers(nn.Module):
    @nn.compact
    def __call__(self, images, texts):
      return nn.Dense(D, name="image_proj")(images), nn.Dense(D, name="text_proj")(texts)

  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(B, 6)), jnp.float32)
  texts = jnp.asarray(rng.normal(size=(B, 5)), jnp.float32)
  params = Towers().init(jax.random.key(0), images, texts)["params"]

  def tower_loss(contrastive):
    def loss(params, images, texts):
      img, txt = Towers().apply({"params": params}, images, texts)
      return contrastive(img, txt, jnp.float32(0.2))
    return jax.value_and_grad(loss)

  mesh = make_mesh()
  data = batch_sharding(mesh)
  gathered = lambda img, txt, tau: gathered_contrastive_loss(mesh, img, txt, tau)[0]
  got_loss, got = jax.jit(tower_loss(gathered), in_shardings=(replicated(mesh), data, data))(
      params, images, texts)
  want_loss, want = tower_loss(_single_device_loss)(params, images, texts)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


def test_batch_not_divisible_by_devices_is_rejected():
  img, txt = jnp.zeros((12, D)), jnp.zeros((12, D))
  with pytest.raises(ValueError, match="batch_size"):
    gathered_similarity_logits(make_mesh(), img, txt, 1.0)
