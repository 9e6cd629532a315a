"""Synthesis losses, each returning one value per image.

Per-image values let the loop average over the valid (non-padding) images only. The two
batch-coupled quantities of PSAQ-ViT (the KDE grid's span, the batch TV) reduce over the
valid images only, so padding a batch to the device count never changes a real image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# PSAQ-ViT's reference setting: the batch TV target U(2500, 3000) was set for this many
# values (32 images of 224 x 224 x 3); other sizes scale it by sqrt(#values / this).
TV_REFERENCE_SIZE = 32 * 224 * 224 * 3


def soft_label_logits(classes: jax.Array, num_classes: int, z: jax.Array) -> jax.Array:
  """SL logits Z (..., num_classes): zero except `z` at the class."""
  return jax.nn.one_hot(classes, num_classes) * jnp.asarray(z)[..., None]


def soft_targets(classes: jax.Array, num_classes: int, z: jax.Array,
                 extra_logits: Optional[jax.Array] = None) -> jax.Array:
  """SL targets softmax(Z): Z is zero except `z` at the class (z ~ U(5, 10) in SPDFQ).

  The target class gets e^z / (e^z + C - 1). `extra_logits` are added to Z (the open
  variant whose whole-image target also carries the region classes).
  """
  logits = soft_label_logits(classes, num_classes, z)
  if extra_logits is not None:
    logits = logits + extra_logits
  return jax.nn.softmax(logits, axis=-1)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(B,) cross-entropy against a distribution (one-hot targets give the usual CE)."""
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """(B,) KL(softmax(p) || softmax(q)) per row."""
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
  return (jnp.exp(log_p) * (log_p - log_q)).sum(-1)


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


def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pearson correlation over the last axis (0 where either side is constant)."""
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  den = jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))
  return jnp.where(den > 0, (a * b).sum(-1) / jnp.maximum(den, 1e-30), 0.0)


def prior_fit(attns: Sequence[jax.Array], priors: Sequence[jax.Array], blocks: Sequence[int],
              prefix: int, swin: bool) -> list[jax.Array]:
  """Per APA block, (B, H): how closely the achieved maps follow their priors, as the
  Pearson correlation over tokens (Swin: per window, averaged over the image's windows)."""
  out = []
  for l, prior in zip(blocks, priors):
    got = achieved_maps(attns[l], prefix, swin, prior.shape[0])
    r = pearson(got, prior[:, None] if swin else prior)  # (B, [nW,] H)
    out.append(r.mean(1) if swin else r)
  return out


def kde_entropy(values: jax.Array, bandwidth: float = 0.01, points: int = 10,
                weights: Optional[np.ndarray] = None,
                span: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
  """(B, M) samples -> (B,) differential entropy of a Gaussian KDE (PSAQ-ViT form).

  The density is evaluated at `points` points between lo and hi (treated as constants, as
  PSAQ-ViT does): `span` = (lo, hi), each (B,), or by default each row's own min and max.
  Then -p log p (p + 1e-4) is integrated by trapezoids. One reduction per point keeps
  memory at O(M) per image instead of O(points * M). `weights` (M,) count each sample
  that many times (a symmetric matrix given as its upper triangle).
  """
  lo, hi = span if span is not None else (values.min(-1), values.max(-1))
  lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
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


def patch_similarity(attn_v: jax.Array, heads: int, skip: int) -> jax.Array:
  """(B', N, D) attention output -> (B', P, P) cosine similarity of the head-averaged
  per-head outputs, the first `skip` tokens dropped (CLS/distillation; Swin: token 0 of
  every window, as PSAQ-ViT's `[:, 1:]` does)."""
  b, n, d = attn_v.shape
  h = attn_v.reshape(b, n, heads, d // heads).mean(2)[:, skip:].astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.maximum((h * h).sum(-1, keepdims=True), 1e-16))
  return jnp.einsum("bpd,bqd->bpq", h, h)


def upper_triangle(p: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat indices of a (p, p) matrix's upper triangle and their multiplicities (2 off the
  diagonal, 1 on it): the KDE of a symmetric matrix at half the exps."""
  rows, cols = np.triu_indices(p)
  return rows * p + cols, np.where(rows == cols, 1.0, 2.0).astype(np.float32)


def batch_span(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(lo, hi), each (B,): min and max over all samples of the valid images (PSAQ-ViT's
  `sims.min()` / `sims.max()` over the whole batch), so padding never moves the grid."""
  valid = mask[:, None] > 0
  lo = jnp.where(valid, values, jnp.inf).min()
  hi = jnp.where(valid, values, -jnp.inf).max()
  b = values.shape[0]
  return jnp.broadcast_to(lo, (b,)), jnp.broadcast_to(hi, (b,))


def block_entropies(attn_vs: Sequence[jax.Array], heads: Sequence[int], skip: int, batch: int,
                    bandwidth: float = 0.01, points: int = 10,
                    mask: Optional[jax.Array] = None) -> list[jax.Array]:
  """Per block, the (B,) KDE entropy of all P x P patch similarities of each image
  (computed over the symmetric matrix's upper triangle).

  With `mask` (B,) the KDE grid spans the batch's min..max over the valid images, as in
  PSAQ-ViT; without, each image's own min..max. Swin: similarities are taken inside each
  window and pooled per image.
  """
  out = []
  for av, h in zip(attn_vs, heads):
    sims = patch_similarity(av, h, skip)
    idx, mult = upper_triangle(sims.shape[-1])
    per_window = sims.reshape(sims.shape[0], -1)[:, idx]  # (B', T)
    windows = per_window.shape[0] // batch
    values = per_window.reshape(batch, -1)
    span = batch_span(values, mask) if mask is not None else None
    out.append(kde_entropy(values, bandwidth, points, np.tile(mult, windows), span))
  return out


def patch_entropy_loss(attn_vs: Sequence[jax.Array], heads: Sequence[int], skip: int,
                       batch: int, bandwidth: float = 0.01, points: int = 10,
                       mask: Optional[jax.Array] = None) -> jax.Array:
  """(B,) PSAQ-ViT's patch-similarity term: minus the sum over blocks of the entropies of
  `block_entropies`."""
  return -sum(block_entropies(attn_vs, heads, skip, batch, bandwidth, points, mask))


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
