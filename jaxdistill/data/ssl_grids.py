"""Self-supervised pretraining images: random 2x2 Fashion-MNIST grids drawn on device inside the
train step, and their augmented views (methods/dino.py, docs/ssl_vit.md).

Grids are composed as the benchmark composes them (data/compositional.py): four 28x28 cells
TL, TR, BL, BR, each one Fashion-MNIST item or empty (black), ~1/11 of cells empty (the
benchmark's layouts put each of the 11 values -- empty or one of 10 classes -- in a cell about
equally often), never a grid with no item; items drawn uniformly from the images handed in (the
60,000 Fashion-MNIST *train* images: the benchmark's val / test items come from its test images,
so pretraining on all train images leaks nothing). There are no captions and no labels. A grid
is a function of a PRNG key: the step key (fold_in(state.rng, step)) gives every step new grids,
and a resumed run the grids an uninterrupted one would have drawn.

Augmentations (`augment_view`) act on each cell separately and never move an item to another
cell (the benchmark's captions are about which item is in which cell): a random zoom about the
cell's centre and a random shift of its content by up to `max_shift` pixels (bilinear
resampling inside the cell, zero fill; content leaving the cell is cut off: DINO's random
resized crop, confined to a cell), a horizontal flip of the cell, an intensity gain, a Gaussian
blur and a solarisation of the cell (DINO's blur / solarise), random erasing of a rectangle
inside the cell, and Gaussian pixel noise. Then the benchmark's normalisation,
(x - IMAGE_MEAN) / IMAGE_STD.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from jaxdistill.data.compositional import (GRID_SIZE, IMAGE_MEAN, IMAGE_STD, NUM_CELLS,
                                           normalize_images)
from jaxdistill.data.fashion_mnist import IMAGE_SIZE

EMPTY_RATE = 1.0 / 11.0   # one of the 11 values a benchmark cell takes (empty, 10 classes)


def sample_grids(key: jax.Array, items: jax.Array, batch_size: int,
                 empty_rate: float = EMPTY_RATE) -> tuple[jax.Array, jax.Array]:
  """batch_size random grids from `key`.

  items: uint8 [N, 28, 28] (the Fashion-MNIST train images). Each cell is empty with
  probability empty_rate, else holds items[i] with i uniform over N; a grid whose four cells
  all came out empty gets one item in a random cell (the benchmark has no empty grid).
  Returns (grids uint8 [B, 56, 56], sources int32 [B, 4]: per cell TL, TR, BL, BR the index
  into items, -1 for an empty cell)."""
  chex.assert_rank(items, 3)
  k_source, k_empty, k_keep = jax.random.split(key, 3)
  sources = jax.random.randint(k_source, (batch_size, NUM_CELLS), 0, items.shape[0], jnp.int32)
  empty = jax.random.uniform(k_empty, (batch_size, NUM_CELLS)) < empty_rate
  keep = jax.random.randint(k_keep, (batch_size,), 0, NUM_CELLS)
  all_empty = empty.all(axis=1, keepdims=True)
  empty = empty & ~(all_empty & (jnp.arange(NUM_CELLS)[None] == keep[:, None]))
  sources = jnp.where(empty, -1, sources)
  cells = jnp.where(empty[..., None, None], jnp.zeros((), items.dtype),
                    items[jnp.maximum(sources, 0)])                      # [B, 4, 28, 28]
  return compose_cells(cells), sources


def compose_cells(cells: jax.Array) -> jax.Array:
  """[B, 4, 28, 28] (TL, TR, BL, BR) -> [B, 56, 56], row-major cells as in the benchmark."""
  b = cells.shape[0]
  return cells.reshape(b, 2, 2, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 1, 3, 2, 4).reshape(
      b, GRID_SIZE, GRID_SIZE)


def split_cells(grids: jax.Array) -> jax.Array:
  """[B, 56, 56] -> [B, 4, 28, 28], the inverse of compose_cells."""
  b = grids.shape[0]
  return grids.reshape(b, 2, IMAGE_SIZE, 2, IMAGE_SIZE).transpose(0, 1, 3, 2, 4).reshape(
      b, NUM_CELLS, IMAGE_SIZE, IMAGE_SIZE)


def normalize(pixels: jax.Array) -> jax.Array:
  """float [B, 56, 56] in [0, 1] -> float32 [B, 56, 56, 1], (x - IMAGE_MEAN) / IMAGE_STD: the
  benchmark's normalisation (data/compositional.normalize_images) on device."""
  return ((pixels.astype(jnp.float32) - IMAGE_MEAN) / IMAGE_STD)[..., None]


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Per-cell augmentation strengths (the `dino` config section's augment_* fields).

  max_shift: content shifted by an integer in [-max_shift, max_shift] pixels per axis;
  zoom: content scaled about the cell centre by a factor uniform in [1 - zoom, 1 + zoom]
  (bilinear; 0 = none, and then the shift moves whole pixels exactly); blur_prob: probability
  of a Gaussian blur of the cell with sigma uniform in [0.1, blur_sigma] pixels (taps within
  the cell); solarize_prob: probability of x -> 1 - x where x >= 0.5 in the cell; flip_prob: probability of a horizontal flip of the cell; gain: intensity multiplied by a
  factor uniform in [1 - gain, 1 + gain] (clipped to [0, 1]); erase_prob: probability of
  blacking out a rectangle of erase_min..erase_max pixels per side inside the cell;
  noise_std: std of the Gaussian noise added to every pixel (0..1 scale, after clipping)."""
  max_shift: int = 3
  zoom: float = 0.0
  blur_prob: float = 0.0
  blur_sigma: float = 1.0
  solarize_prob: float = 0.0
  flip_prob: float = 0.5
  gain: float = 0.3
  erase_prob: float = 0.25
  erase_min: int = 4
  erase_max: int = 12
  noise_std: float = 0.05


def _resample_cell(cell: jax.Array, scale: jax.Array, dy: jax.Array, dx: jax.Array) -> jax.Array:
  """[28, 28] content scaled by `scale` about the cell centre, then moved by (dy, dx) pixels;
  bilinear, zeros where nothing moved in. scale 1 and integer shifts move whole pixels exactly."""
  centre = (IMAGE_SIZE - 1) / 2
  grid = jnp.arange(IMAGE_SIZE, dtype=jnp.float32) - centre
  ys = grid[:, None] / scale + centre - dy
  xs = grid[None, :] / scale + centre - dx
  ys, xs = jnp.broadcast_arrays(ys, xs)
  return map_coordinates(cell, [ys, xs], order=1, mode="constant", cval=0.0)


def _blur_cell(cell: jax.Array, sigma: jax.Array) -> jax.Array:
  """[28, 28] separable Gaussian blur (5 taps, zero padding inside the cell)."""
  taps = jnp.arange(-2, 3, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (taps / sigma) ** 2)
  kernel = kernel / kernel.sum()
  rows = jax.vmap(lambda r: jnp.convolve(r, kernel, mode="same"))(cell)
  return jax.vmap(lambda c: jnp.convolve(c, kernel, mode="same"), in_axes=1, out_axes=1)(rows)


def augment_view(key: jax.Array, grids: jax.Array, aug: Augmentation) -> jax.Array:
  """One augmented view of each grid: uint8 or float [B, 56, 56] (0..255) -> float32
  [B, 56, 56, 1] normalised as the benchmark. Every operation stays inside its cell."""
  b = grids.shape[0]
  cells = split_cells(grids.astype(jnp.float32) / 255.0)              # [B, 4, 28, 28] in [0, 1]
  n = b * NUM_CELLS
  flat = cells.reshape(n, IMAGE_SIZE, IMAGE_SIZE)
  (k_shift, k_zoom, k_flip, k_gain, k_erase, k_where, k_size, k_noise, k_blur, k_sigma,
   k_solarize) = jax.random.split(key, 11)
  if aug.max_shift > 0 or aug.zoom > 0:
    shifts = jax.random.randint(k_shift, (n, 2), -aug.max_shift, aug.max_shift + 1)
    scales = jax.random.uniform(k_zoom, (n,), minval=1.0 - aug.zoom, maxval=1.0 + aug.zoom)
    flat = jax.vmap(_resample_cell)(flat, scales, shifts[:, 0].astype(jnp.float32),
                                    shifts[:, 1].astype(jnp.float32))
  if aug.flip_prob > 0:
    flip = jax.random.uniform(k_flip, (n, 1, 1)) < aug.flip_prob
    flat = jnp.where(flip, flat[:, :, ::-1], flat)
  if aug.gain > 0:
    gain = jax.random.uniform(k_gain, (n, 1, 1), minval=1.0 - aug.gain, maxval=1.0 + aug.gain)
    flat = jnp.clip(flat * gain, 0.0, 1.0)
  if aug.blur_prob > 0:
    sigma = jax.random.uniform(k_sigma, (n,), minval=0.1, maxval=max(aug.blur_sigma, 0.1))
    blur = jax.random.uniform(k_blur, (n, 1, 1)) < aug.blur_prob
    flat = jnp.where(blur, jax.vmap(_blur_cell)(flat, sigma), flat)
  if aug.solarize_prob > 0:
    solarize = jax.random.uniform(k_solarize, (n, 1, 1)) < aug.solarize_prob
    flat = jnp.where(solarize & (flat >= 0.5), 1.0 - flat, flat)
  if aug.erase_prob > 0:
    size = jax.random.randint(k_size, (n, 2), aug.erase_min, aug.erase_max + 1)
    corner = jnp.floor(jax.random.uniform(k_where, (n, 2)) * (IMAGE_SIZE - size + 1)).astype(
        jnp.int32)                                                  # the rectangle fits the cell
    rows = jnp.arange(IMAGE_SIZE)
    inside_y = (rows[None] >= corner[:, :1]) & (rows[None] < corner[:, :1] + size[:, :1])
    inside_x = (rows[None] >= corner[:, 1:]) & (rows[None] < corner[:, 1:] + size[:, 1:])
    erase = jax.random.uniform(k_erase, (n, 1, 1)) < aug.erase_prob
    flat = jnp.where(erase & inside_y[:, :, None] & inside_x[:, None, :], 0.0, flat)
  pixels = compose_cells(flat.reshape(b, NUM_CELLS, IMAGE_SIZE, IMAGE_SIZE))
  if aug.noise_std > 0:
    pixels = pixels + aug.noise_std * jax.random.normal(k_noise, pixels.shape)
  return normalize(pixels)


def probe_grids(items: np.ndarray) -> np.ndarray:
  """uint8 [N, 28, 28] -> float32 [N, 56, 56, 1]: each item alone in the top-left cell of an
  otherwise empty grid, normalised exactly as the benchmark (compositional.normalize_images);
  the linear probe's input (evaluate/probe.py)."""
  grids = np.zeros((len(items), GRID_SIZE, GRID_SIZE), np.uint8)
  grids[:, :IMAGE_SIZE, :IMAGE_SIZE] = items
  return normalize_images(grids)
