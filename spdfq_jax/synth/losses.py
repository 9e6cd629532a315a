"""Synthesis losses, each returning one value per image so that images stay independent.

Per-image values let the loop average over the valid (non-padding) images only, so padding
a batch to the device count never changes a real image's gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# PSAQ-ViT's reference setting: the batch TV target U(2500, 3000) was set for this many
# values (32 images of 224 x 224 x 3); other sizes scale it by sqrt(#values / this).
TV_REFERENCE_SIZE = 32 * 224 * 224 * 3


def soft_targets(classes: jax.Array, num_classes: int, z: jax.Array) -> jax.Array:
  """SL targets softmax(Z): Z is zero except `z` at the class (z ~ U(5, 10) in SPDFQ)."""
  return jax.nn.softmax(jax.nn.one_hot(classes, num_classes) * z[..., None], axis=-1)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(B,) cross-entropy against a distribution (one-hot targets give the usual CE)."""
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1)


def cls_attention(attn: jax.Array, prefix: int) -> jax.Array:
  """(B, H, N, N) -> (B, H, P): the CLS row over patch tokens, renormalised to sum one."""
  row = attn[:, :, 0, prefix:]
  return row / row.sum(-1, keepdims=True)


def window_attention(attn: jax.Array, batch: int) -> jax.Array:
  """(B * nW, H, N, N) -> (B, nW, H, N): Swin attention averaged over query tokens."""
  a = attn.mean(axis=2)
  return a.reshape(batch, -1, *a.shape[1:])


def achieved_maps(attn: jax.Array, prefix: int, swin: bool, batch: int) -> jax.Array:
  """What APA compares with the prior: (B, H, G) (ViT) or (B, nW, H, G) (Swin)."""
  return window_attention(attn, batch) if swin else cls_attention(attn, prefix)


def depth_weights(blocks: Sequence[int], depth: int, weighted: bool = True) -> list[float]:
  """APA weight l / L of each (0-based) block, l counted from 1; all ones when not weighted."""
  return [(l + 1) / depth if weighted else 1.0 for l in blocks]


def apa_loss(attns: Sequence[jax.Array], priors: Sequence[jax.Array], blocks: Sequence[int],
             weights: Sequence[float], prefix: int, swin: bool) -> jax.Array:
  """(B,) sum over APA blocks and heads of weight * MSE(attention, prior).

  The MSE is a mean over tokens (and, for Swin, over the windows of the image).
  """
  total = 0.0
  for l, w, prior in zip(blocks, weights, priors):
    b = prior.shape[0]
    got = achieved_maps(attns[l], prefix, swin, b)
    ref = prior[:, None] if swin else prior
    err = (got - ref) ** 2  # (B, [nW,] H, G)
    per_head = err.mean(-1).mean(1) if swin else err.mean(-1)  # (B, H)
    total = total + w * per_head.sum(-1)
  return total


def kde_entropy(values: jax.Array, bandwidth: float = 0.01, points: int = 10,
                weights: Optional[np.ndarray] = None) -> jax.Array:
  """(B, M) samples -> (B,) differential entropy of a Gaussian KDE (PSAQ-ViT form).

  The density is evaluated at `points` points between each image's min and max (treated as
  constants, as PSAQ-ViT does), then -p log p (p + 1e-4) is integrated by trapezoids. One
  reduction per point keeps memory at O(M) per image instead of O(points * M). `weights`
  (M,) count each sample that many times (a symmetric matrix given as its upper triangle).
  """
  lo = jax.lax.stop_gradient(values.min(-1))
  hi = jax.lax.stop_gradient(values.max(-1))
  norm = 1.0 / (bandwidth * jnp.sqrt(2 * jnp.pi))
  if weights is None:
    weights = np.ones(values.shape[-1], np.float32)
  w = jnp.asarray(weights / weights.sum(), values.dtype)
  grid = [lo + (hi - lo) * t / (points - 1) for t in range(points)]
  dens = jnp.stack([norm * (jnp.exp(-0.5 * ((values - g[:, None]) / bandwidth) ** 2) @ w)
                    for g in grid], -1)  # (B, points)
  p = dens + 1e-4
  f = -p * jnp.log(p)
  dx = (hi - lo) / (points - 1)
  return dx * (f.sum(-1) - 0.5 * (f[:, 0] + f[:, -1]))


def patch_similarity(attn_v: jax.Array, heads: int, prefix: int) -> jax.Array:
  """(B', N, D) attention output -> (B', P, P) cosine similarity of the head-averaged
  per-head outputs, prefix (CLS/distillation) tokens dropped."""
  b, n, d = attn_v.shape
  h = attn_v.reshape(b, n, heads, d // heads).mean(2)[:, prefix:].astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.maximum((h * h).sum(-1, keepdims=True), 1e-16))
  return jnp.einsum("bpd,bqd->bpq", h, h)


def upper_triangle(p: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat indices of a (p, p) matrix's upper triangle and their multiplicities (2 off the
  diagonal, 1 on it): the KDE of a symmetric matrix at half the exps."""
  rows, cols = np.triu_indices(p)
  return rows * p + cols, np.where(rows == cols, 1.0, 2.0).astype(np.float32)


def patch_entropy_loss(attn_vs: Sequence[jax.Array], heads: Sequence[int], prefix: int,
                       batch: int, bandwidth: float = 0.01, points: int = 10) -> jax.Array:
  """(B,) PSAQ-ViT's patch-similarity term: minus the sum over blocks of the KDE entropy of
  all P x P similarities (computed over the symmetric matrix's upper triangle).

  Swin: similarities are taken inside each window and pooled per image.
  """
  total = 0.0
  for av, h in zip(attn_vs, heads):
    sims = patch_similarity(av, h, prefix)
    idx, mult = upper_triangle(sims.shape[-1])
    per_window = sims.reshape(sims.shape[0], -1)[:, idx]  # (B', T)
    windows = per_window.shape[0] // batch
    values = per_window.reshape(batch, -1)
    total = total - kde_entropy(values, bandwidth, points, np.tile(mult, windows))
  return total


def tv_sq_norms(x: jax.Array) -> jax.Array:
  """(B, 4): squared L2 norms of the four neighbour differences of each NHWC image."""
  d = (x[:, :, :-1] - x[:, :, 1:],
       x[:, :-1] - x[:, 1:],
       x[:, 1:, :-1] - x[:, :-1, 1:],
       x[:, :-1, :-1] - x[:, 1:, 1:])
  return jnp.stack([(v.astype(jnp.float32) ** 2).sum((1, 2, 3)) for v in d], -1)


def tv_batch(x: jax.Array, mask: jax.Array) -> jax.Array:
  """PSAQ-ViT's TV: sum over the four directions of the L2 norm over the (valid) batch."""
  return jnp.sqrt((tv_sq_norms(x) * mask[:, None]).sum(0) + 1e-12).sum()


def tv_target_scale(n_valid: int, image_shape: Sequence[int]) -> float:
  """Factor that carries PSAQ-ViT's 224-px, 32-image TV target to this batch and size."""
  size = n_valid
  for s in image_shape:
    size *= s
  return float((size / TV_REFERENCE_SIZE) ** 0.5)
