"""APA attention priors: one random structured map per (image, block, head).

A prior is a mixture of k ~ U{1..K} isotropic bumps on the token grid (ViT/DeiT: the patch
grid; Swin: the window grid), evaluated at the cell centres, flattened and normalised to sum
one, so it is directly comparable with a row of post-softmax attention. Priors are drawn
once per run on the host from a generator seeded by (seed, image index, block), so they do
not depend on the batch layout, the device count or a resume, and cost no compilation.
"""
from __future__ import annotations

import numpy as np

GMM = "gmm"
LAPLACE = "laplace"
REAL = "real"
_STREAM = 3  # keeps these draws apart from the other per-image streams of a seed


def mixture_map(rng: np.random.Generator, grid: int, max_components: int,
                sigma_range: tuple[float, float], kind: str = GMM) -> np.ndarray:
  """One prior, (grid * grid,) float32 summing to one.

  k ~ U{1..K}; means uniform on the grid (cell coordinates); sigma ~ U[sigma_range] cells;
  weights Dirichlet(1) over the k components. `laplace` swaps the Gaussian bump for
  exp(-distance / sigma).
  """
  k = int(rng.integers(1, max_components + 1))
  means = rng.uniform(0.0, grid - 1.0, (k, 2))
  sigma = rng.uniform(sigma_range[0], sigma_range[1], (k, 1))
  w = rng.dirichlet(np.ones(k))
  yy, xx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  pos = np.stack([yy.ravel(), xx.ravel()], -1).astype(np.float64)  # (G, 2)
  d2 = ((pos[None] - means[:, None]) ** 2).sum(-1)  # (k, G)
  if kind == GMM:
    dens = np.exp(-0.5 * d2 / sigma ** 2) / (2 * np.pi * sigma ** 2)
  elif kind == LAPLACE:
    dens = np.exp(-np.sqrt(d2) / sigma) / (2 * np.pi * sigma ** 2)
  else:
    raise ValueError(f"unknown prior kind {kind!r} (gmm | laplace | real)")
  p = (w[:, None] * dens).sum(0)
  return (p / p.sum()).astype(np.float32)


def draw_priors(seed: int, indices: np.ndarray, layout: list[tuple[int, int]],
                max_components: int, sigma_range: tuple[float, float], kind: str = GMM
                ) -> list[np.ndarray]:
  """Priors for images `indices` (global image numbers), one (B, heads, grid**2) per APA block.

  `layout` lists (heads, grid) of the APA blocks in order; every head gets its own mixture.
  """
  out = []
  for j, (heads, grid) in enumerate(layout):
    maps = np.empty((len(indices), heads, grid * grid), np.float32)
    for b, i in enumerate(indices):
      rng = np.random.default_rng([seed, _STREAM, int(i), j])
      for h in range(heads):
        maps[b, h] = mixture_map(rng, grid, max_components, sigma_range, kind)
    out.append(maps)
  return out
