"""Image decoding and the train / eval transforms at a configurable resolution (224 default),
with the normalisation constants of the checkpoint the images are for.

Train: RandomResizedCrop (torchvision's sampling: area fraction in `scale`, aspect ratio
log-uniform in `ratio`, 10 tries then a centre crop) resized to size x size, then a horizontal
flip with probability 1/2. The default scale (0.9, 1.0) is CLIP-style fine-tuning's (open_clip's
training transform): retrieval captions name objects anywhere in the image, and ImageNet's
(0.08, 1.0) would crop many of them out; pass scale=(0.08, 1.0) for from-scratch training. Eval:
resize the shorter side to `resize` (bicubic, Hugging Face's size rounding), centre crop
size x size (Hugging Face's offsets), as CLIPImageProcessor does. Output: float32 [S, S, 3],
(x / 255 - mean) / std, or uint8 [S, S, 3] when the caller normalises on device."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import numpy as np
from PIL import Image

from jaxdistill.data.real.records import DataError, ImageRef

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)      # OpenAI CLIP's preprocessor_config.json
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_FILE = "preprocessor_config.json"


class BadImage(Exception):
  """An image that cannot be used; reason "missing" (no such file / no image) or "corrupt"."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """size: output side S (crop); resize: eval shorter side before the centre crop (0: resize
  straight to S x S, as ViT's processors do); mean / std: per-channel constants on [0, 1];
  resample: PIL filter (3 bicubic, CLIP's; 2 bilinear)."""
  size: int = 224
  resize: int = 224
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  resample: int = Image.Resampling.BICUBIC

  def __post_init__(self):
    if self.size < 1 or self.resize < 0 or (self.resize and self.resize < self.size):
      raise ValueError(f"ImageSpec size={self.size}, resize={self.resize}: need size >= 1 and "
                       "resize 0 or >= size")
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f"ImageSpec mean={self.mean}, std={self.std}: 3 values each, std > 0")

  def at_size(self, size: int) -> "ImageSpec":
    """The same transform at another resolution; resize keeps its ratio to size (256/224 stays)."""
    resize = round(self.resize * size / self.size) if self.resize else 0
    return dataclasses.replace(self, size=size, resize=resize)

  @classmethod
  def from_preprocessor_config(cls, path: str, size: int | None = None) -> "ImageSpec":
    """From a Hugging Face preprocessor_config.json (or the checkpoint directory holding it):
    image_mean / image_std, size (an int or {"shortest_edge": s}: shorter side; {"height": h,
    "width": w}: straight resize), crop_size (an int or {"height", "width"}; absent or
    do_center_crop false: the resize's size) and resample. `size` overrides the resolution."""
    file = os.path.join(path, PREPROCESSOR_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise DataError(f"preprocessor config {file} does not exist: point at the checkpoint's "
                      f"{PREPROCESSOR_FILE} (or its directory), or give mean / std explicitly")
    try:
      with open(file, encoding="utf-8") as f:
        config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{file} is not valid JSON ({e})") from e
    missing = [k for k in ("image_mean", "image_std", "size") if k not in config]
    if missing:
      raise DataError(f"{file} lacks {', '.join(missing)}: it is not an image processor config")

    def side(value, what):
      if isinstance(value, int):
        return value, True
      if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"]), True
      if isinstance(value, dict) and value.get("height") == value.get("width") is not None:
        return int(value["height"]), False
      raise DataError(f"{file}: {what}={value!r} is not an int, {{'shortest_edge': s}} or a "
                      "square {'height': s, 'width': s}")

    resize, shortest = side(config["size"], "size")
    crop = config.get("crop_size")
    if crop is not None and config.get("do_center_crop", True):
      crop_side, _ = side(crop, "crop_size")
    else:
      crop_side = resize
    mean, std = tuple(config["image_mean"]), tuple(config["image_std"])
    if len(mean) == 1:      # grayscale processors give one value
      mean, std = mean * 3, std * 3
    spec = cls(size=crop_side, resize=resize if shortest else 0, mean=mean, std=std,
               resample=int(config.get("resample", Image.Resampling.BICUBIC)))
    return spec.at_size(size) if size else spec


def decode_image(image: ImageRef) -> Image.Image:
  """An RGB PIL image from a path, encoded bytes or a uint8 array; BadImage("missing") when the
  file cannot be opened or there is no image, BadImage("corrupt") when it does not decode."""
  if image is None:
    raise BadImage("missing", "the sample has no image")
  if isinstance(image, np.ndarray):
    array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    try:
      return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).convert("RGB")
    except (TypeError, ValueError) as e:
      raise BadImage("corrupt", f"array {image.shape} {image.dtype}: {e}") from e
  if isinstance(image, str):
    try:
      with open(image, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadImage("missing", f"{image}: {e.strerror or e}") from e
    where = image
  else:
    data, where = image, f"{len(image)} bytes"
  try:
    with Image.open(io.BytesIO(data)) as opened:
      opened.load()
      return opened.convert("RGB")
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    raise BadImage("corrupt", f"{where}: {e}") from e


def random_resized_box(width: int, height: int, rng: np.random.Generator, *,
                       scale: tuple[float, float] = (0.9, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(left, top, w, h) of a RandomResizedCrop box in a width x height image (torchvision's
  get_params: area fraction ~ U(scale), aspect ~ exp(U(log ratio)), 10 tries, then the centre
  crop at the nearest allowed aspect ratio)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, *,
                        scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        resample: int = Image.Resampling.BICUBIC) -> Image.Image:
  """The random_resized_box of `image` resized to size x size."""
  left, top, w, h = random_resized_box(*image.size, rng, scale=scale, ratio=ratio)
  return image.resize((size, size), resample, box=(left, top, left + w, top + h))


def resize_center_crop(image: Image.Image, spec: ImageSpec) -> Image.Image:
  """Shorter side to spec.resize (longer: int(resize * long / short)), then the centre
  spec.size crop at offsets ((H - S) // 2, (W - S) // 2); spec.resize 0: straight to S x S."""
  if not spec.resize:
    return image.resize((spec.size, spec.size), spec.resample)
  width, height = image.size
  short, long = min(width, height), max(width, height)
  new_long = int(spec.resize * long / short)
  new_size = (spec.resize, new_long) if width <= height else (new_long, spec.resize)
  image = image.resize(new_size, spec.resample)
  width, height = image.size
  top, left = (height - spec.size) // 2, (width - spec.size) // 2
  return image.crop((left, top, left + spec.size, top + spec.size))


def to_array(image: Image.Image, spec: ImageSpec, normalize: bool = True) -> np.ndarray:
  """float32 [S, S, 3] (x / 255 - mean) / std, or uint8 [S, S, 3] with normalize=False."""
  array = np.asarray(image, dtype=np.uint8)
  if not normalize:
    return array
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return ((array.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def train_image(image: ImageRef, spec: ImageSpec, rng: np.random.Generator, *,
                scale: tuple[float, float] = (0.9, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                normalize: bool = True) -> np.ndarray:
  """Decode, RandomResizedCrop to spec.size, flip with probability 1/2: [S, S, 3]."""
  crop = random_resized_crop(decode_image(image), spec.size, rng, scale=scale, ratio=ratio,
                             resample=spec.resample)
  if flip and rng.uniform() < 0.5:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return to_array(crop, spec, normalize)


def eval_image(image: ImageRef, spec: ImageSpec, normalize: bool = True) -> np.ndarray:
  """Decode, resize the shorter side, centre crop: [S, S, 3]."""
  return to_array(resize_center_crop(decode_image(image), spec), spec, normalize)
