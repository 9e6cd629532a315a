"""MSR regions: non-overlapping cells of a g x g grid (default the four quadrants).

A region is cropped by static slicing and resized back to the input size with a linear
(bilinear) resize, so its loss has a gradient only inside the region of the image.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def region_slices(height: int, width: int, grid: int = 2) -> list[tuple[slice, slice]]:
  """Row-major cells of a grid x grid split (edges rounded down, the last cell takes the rest)."""
  ys = [height * i // grid for i in range(grid + 1)]
  xs = [width * i // grid for i in range(grid + 1)]
  return [(slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
          for i in range(grid) for j in range(grid)]


def crop_resize(x: jax.Array, region: tuple[slice, slice]) -> jax.Array:
  """(B, H, W, C) -> the region of every image, bilinearly resized to (H, W)."""
  crop = x[:, region[0], region[1]]
  return jax.image.resize(crop, x.shape, method="bilinear", antialias=False)


def all_regions(x: jax.Array, grid: int = 2) -> jax.Array:
  """(B, H, W, C) -> (B, R, H, W, C), every region of every image at input size."""
  return jnp.stack([crop_resize(x, r) for r in region_slices(x.shape[1], x.shape[2], grid)], 1)


def select_regions(key: jax.Array, num_regions: int, max_regions: int) -> jax.Array:
  """(R,) bool: m ~ U{1..max_regions} distinct regions chosen uniformly at random."""
  km, kp = jax.random.split(key)
  m = jax.random.randint(km, (), 1, min(max_regions, num_regions) + 1)
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(kp, (num_regions,))))
  return rank < m
