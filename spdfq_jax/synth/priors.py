"""APA attention priors: one random structured map per (image, block, head).

A prior is a mixture of k ~ U{1..K} isotropic bumps on the token grid (ViT/DeiT: the patch
grid; Swin: the window grid), evaluated at the cell centres, flattened and normalised to sum
one, so it is directly comparable with a row of post-softmax attention. Priors are drawn
once per image from a key derived from the seed and the image index, so they do not depend
on the batch layout, the device count or a resume.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

GMM = "gmm"
LAPLACE = "laplace"
REAL = "real"


def mixture_map(key: jax.Array, grid: int, max_components: int, sigma_range: tuple[float, float],
                kind: str = GMM) -> jax.Array:
  """One prior, (grid * grid,) summing to one.

  k ~ U{1..K}; means uniform on the grid; sigma ~ U[sigma_range] (in cells); weights
  Dirichlet(1) over the k active components (a Gamma(1) draw per slot, inactive slots zeroed).
  """
  kk, km, ks, kw = jax.random.split(key, 4)
  k = jax.random.randint(kk, (), 1, max_components + 1)
  means = jax.random.uniform(km, (max_components, 2), maxval=grid - 1.0)
  sigma = jax.random.uniform(ks, (max_components,), minval=sigma_range[0], maxval=sigma_range[1])
  w = jax.random.exponential(kw, (max_components,)) * (jnp.arange(max_components) < k)
  w = w / w.sum()
  yy, xx = jnp.meshgrid(jnp.arange(grid, dtype=jnp.float32), jnp.arange(grid, dtype=jnp.float32),
                        indexing="ij")
  pos = jnp.stack([yy.ravel(), xx.ravel()], -1)  # (G, 2)
  d2 = ((pos[None] - means[:, None]) ** 2).sum(-1)  # (K, G)
  s = sigma[:, None]
  if kind == GMM:
    dens = jnp.exp(-0.5 * d2 / s ** 2) / (2 * jnp.pi * s ** 2)
  elif kind == LAPLACE:
    dens = jnp.exp(-jnp.sqrt(d2 + 1e-12) / s) / (2 * jnp.pi * s ** 2)
  else:
    raise ValueError(f"unknown prior kind {kind!r} (gmm | laplace | real)")
  p = (w[:, None] * dens).sum(0)
  return p / p.sum()


def image_priors(key: jax.Array, heads: int, grid: int, max_components: int,
                 sigma_range: tuple[float, float], kind: str = GMM) -> jax.Array:
  """(heads, grid * grid): a different mixture for every head of one block of one image."""
  keys = jax.random.split(key, heads)
  return jax.vmap(lambda k: mixture_map(k, grid, max_components, sigma_range, kind))(keys)


def draw_priors(key: jax.Array, indices: jax.Array, layout: list[tuple[int, int]],
                max_components: int, sigma_range: tuple[float, float], kind: str = GMM
                ) -> list[jax.Array]:
  """Priors for images `indices` (global image numbers), one (B, heads, grid**2) per APA block.

  `layout` lists (heads, grid) of the APA blocks in order. The key of (image i, block j) is
  fold_in(fold_in(key, i), j): independent of how the batch is split or padded.
  """
  out = []
  for j, (heads, grid) in enumerate(layout):
    def one(i, j=j, heads=heads, grid=grid):
      return image_priors(jax.random.fold_in(jax.random.fold_in(key, i), j), heads, grid,
                          max_components, sigma_range, kind)
    out.append(jax.vmap(one)(indices))
  return out
