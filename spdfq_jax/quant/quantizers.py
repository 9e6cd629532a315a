"""Fake quantizers: pure functions over arrays, with straight-through gradients.

Uniform quantizers map x to `scale * (clip(round(x / scale) + zero, qmin, qmax) - zero)`.
The gradient w.r.t. x is the identity inside the representable range and zero outside
(straight-through estimator through the rounding, true gradient of the clip), so
block-wise reconstruction can train the weights behind a quantizer. Scales and zero
points are treated as constants (ranges are frozen once calibrated).

Granularity is expressed as the axes a range reduces over:
  'tensor'  every axis (one range),
  'channel' every axis but the last (one range per channel; for kernels the output channel),
  'token'   only the last axis (one range per token, computed on the fly).

Post-softmax attention has its own quantizers: `log2_quant` (powers of two, or of sqrt 2
as in RepQ-ViT, below a calibrated maximum) and `shift_log2_quant` (I&S-ViT's shift-uniform-log2: a
uniform quantizer in the domain of -log2(x + shift), which spends levels more evenly).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

GRANULARITIES = ("tensor", "channel", "token")
EPS = 1e-8  # smallest scale: a constant tensor quantizes to itself instead of NaN
# Percentile candidates of I&S-ViT's UniformQuantizer (quant/quantizer.py): the range of a
# candidate p is [quantile(1 - p), quantile(p)].
ACT_CANDIDATES = (0.999, 0.9999, 0.99999)
WEIGHT_CANDIDATES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)
# Shift candidates of its post-softmax quantizer.
LOG2_SHIFTS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)


def check_bits(bits: int) -> int:
  """Bits must be an integer in 2..8; anything else is a configuration error."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
    raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
  return int(bits)


def qrange(bits: int, symmetric: bool = False) -> tuple[int, int]:
  """(qmin, qmax) of the integer grid: [0, 2^b - 1], or [-2^(b-1), 2^(b-1) - 1] if symmetric."""
  bits = check_bits(bits)
  if symmetric:
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def reduce_axes(ndim: int, granularity: str) -> tuple[int, ...]:
  """Axes a range is taken over for a tensor of rank `ndim`."""
  if granularity == "tensor":
    return tuple(range(ndim))
  if granularity == "channel":
    return tuple(range(ndim - 1))
  if granularity == "token":
    return (ndim - 1,)
  raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def round_ste(x: jax.Array) -> jax.Array:
  """round(x) forward, identity backward."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


# --- ranges ------------------------------------------------------------------------------

def minmax_range(x: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  return jnp.min(x, axis=tuple(axes)), jnp.max(x, axis=tuple(axes))


def percentile_range(x: jax.Array, axes: Sequence[int], pct: float = 99.99
                     ) -> tuple[jax.Array, jax.Array]:
  """(100 - pct)-th and pct-th percentiles: outliers beyond them are clipped."""
  axes = tuple(axes)
  keep = [a for a in range(x.ndim) if a not in axes]
  flat = jnp.moveaxis(x, keep, list(range(len(keep)))).reshape(
      tuple(x.shape[a] for a in keep) + (-1,))
  return (jnp.percentile(flat, 100.0 - pct, axis=-1), jnp.percentile(flat, pct, axis=-1))


def scale_zero(lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool = False
               ) -> tuple[jax.Array, jax.Array]:
  """Scale and integer zero point covering [lo, hi]; the range always includes 0 so that
  zero (padding, ReLU-like outputs) is exactly representable."""
  qmin, qmax = qrange(bits, symmetric)
  lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
  hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
  if symmetric:
    scale = jnp.maximum(jnp.maximum(-lo, hi) / qmax, EPS)
    return scale, jnp.zeros_like(scale)
  scale = jnp.maximum((hi - lo) / (qmax - qmin), EPS)
  zero = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
  return scale, zero


def fake_quant(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int,
               symmetric: bool = False) -> jax.Array:
  """Uniform fake quantization; scale/zero broadcast against x (shape () or (C,)).

  round(x / scale) + zero, clipped to the grid, back to floats; the gradient w.r.t. x is the
  identity where the rounded code lies strictly inside the grid, zero at and beyond its
  first and last code (as I&S-ViT's torch.clamp). The zero
  point need not be an integer (the reparameterised mean of per-channel zero points is not).
  """
  qmin, qmax = qrange(bits, symmetric)
  scale = jax.lax.stop_gradient(scale)
  zero = jax.lax.stop_gradient(zero)
  q = jnp.round(jax.lax.stop_gradient(x) / scale) + zero
  xq = (jnp.clip(q, qmin, qmax) - zero) * scale
  # Gradient where the rounded code lies strictly inside the grid: torch.clamp with scalar
  # bounds, as I&S-ViT uses it, passes no gradient at the bounds themselves.
  inside = (q > qmin) & (q < qmax)
  return jnp.where(inside, x + jax.lax.stop_gradient(xq - x),
                   jax.lax.stop_gradient(xq)).astype(x.dtype)


def to_int(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int,
           symmetric: bool = False) -> jax.Array:
  """The integers behind `fake_quant` (int32), for export and integer inference."""
  qmin, qmax = qrange(bits, symmetric)
  return jnp.clip(jnp.round(x / scale) + zero, qmin, qmax).astype(jnp.int32)


def mse_range(x: jax.Array, axes: Sequence[int], bits: int, symmetric: bool = False,
              grid: int = 20, min_ratio: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Clipping search: shrink [min, max] by ratios in [min_ratio, 1] and keep, per range,
  the one with the smallest squared quantization error."""
  lo, hi = minmax_range(x, axes)
  ratios = jnp.linspace(min_ratio, 1.0, grid)
  errs = jax.lax.map(lambda r: quant_error(x, axes, lo * r, hi * r, bits, symmetric), ratios)
  best = ratios[jnp.argmin(errs, axis=0)]
  return lo * best, hi * best


def quant_error(x: jax.Array, axes: Sequence[int], lo: jax.Array, hi: jax.Array, bits: int,
                symmetric: bool = False) -> jax.Array:
  """Sum of squared fake-quantization errors of x for the range [lo, hi], per range."""
  s, z = scale_zero(lo, hi, bits, symmetric)
  s, z = _expand(s, x.ndim, axes), _expand(z, x.ndim, axes)
  return jnp.sum((x - fake_quant(x, s, z, bits, symmetric)) ** 2, axis=tuple(axes))


def _expand(v: jax.Array, ndim: int, axes: Sequence[int]) -> jax.Array:
  """Re-inserts reduced axes so a per-range value broadcasts against the tensor."""
  return jnp.expand_dims(v, tuple(axes)) if jnp.ndim(v) else v


def dynamic_fake_quant(x: jax.Array, bits: int, symmetric: bool = False,
                       granularity: str = "token") -> jax.Array:
  """Fake quantization with ranges taken from x itself (per-token activations)."""
  axes = reduce_axes(x.ndim, granularity)
  lo, hi = minmax_range(jax.lax.stop_gradient(x), axes)
  s, z = scale_zero(lo, hi, bits, symmetric)
  return fake_quant(x, _expand(s, x.ndim, axes), _expand(z, x.ndim, axes), bits, symmetric)


@functools.partial(jax.jit, static_argnames=("bits", "granularity", "method", "symmetric",
                                             "pct", "grid", "candidates"))
def quantize_tensor(x: jax.Array, bits: int, granularity: str = "channel",
                    method: str = "minmax", symmetric: bool = False, pct: float = 99.99,
                    grid: int = 20, candidates: tuple = WEIGHT_CANDIDATES
                    ) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) for a whole tensor known in advance (weights), shaped for broadcasting
  against the last axis: () per tensor, (C,) per channel."""
  if granularity == "token":
    raise ValueError("per-token ranges are dynamic; use dynamic_fake_quant")
  axes = reduce_axes(x.ndim, granularity)
  if method == "percentile_mse":
    if symmetric:
      raise ValueError("the percentile-pair search is asymmetric; set symmetric=False")
    return percentile_mse_search(x, axes, bits, candidates)
  if method == "minmax":
    lo, hi = minmax_range(x, axes)
  elif method == "percentile":
    lo, hi = percentile_range(x, axes, pct)
  elif method == "mse":
    lo, hi = mse_range(x, axes, bits, symmetric, grid)
  else:
    raise ValueError("range method must be 'percentile_mse', 'minmax', 'percentile' or 'mse', "
                     f"got {method!r}")
  return scale_zero(lo, hi, bits, symmetric)


# --- post-softmax ------------------------------------------------------------------------

def log2_quant(x: jax.Array, scale: jax.Array, bits: int, step: float = 1.0) -> jax.Array:
  """x >= 0 -> scale * 2^(-q * step), q = round(-log2(x / scale) / step) in [0, 2^b - 1];
  smaller values, below the last level, become 0. step 1: log2 (FQ-ViT); step 0.5: the
  log-sqrt2 quantizer of RepQ-ViT (half the rounding error, half the dynamic range).
  Straight-through inside the levels, zero gradient below."""
  levels = 2 ** check_bits(bits)
  scale = jax.lax.stop_gradient(scale)
  xs = jax.lax.stop_gradient(x)
  e = jnp.round(-jnp.log2(jnp.maximum(xs / scale, 2.0 ** -(step * levels + 2))) / step)
  inside = e < levels
  xq = jnp.where(inside, scale * 2.0 ** (-step * jnp.clip(e, 0, levels - 1)), 0.0)
  return jnp.where(inside & (xs <= scale), x + jax.lax.stop_gradient(xq - x),
                   jax.lax.stop_gradient(xq)).astype(x.dtype)


def shift_log2_quant(x: jax.Array, scale: jax.Array, zero: jax.Array, shift: jax.Array,
                     bits: int) -> jax.Array:
  """I&S-ViT shift-uniform-log2: t = -log2(x + shift) quantized uniformly (scale, zero)
  then mapped back, 2^-t - shift. The shift bounds t, so levels are not wasted on tiny
  probabilities; the uniform grid in t spends them where the mass is."""
  shift = jax.lax.stop_gradient(shift)
  scale = jax.lax.stop_gradient(scale)
  zero = jax.lax.stop_gradient(zero)
  xs = jax.lax.stop_gradient(x)
  t = -jnp.log2(jnp.maximum(xs + shift, EPS))
  qmin, qmax = qrange(bits)
  q = jnp.round(t / scale) + zero
  inside = (q >= qmin) & (q <= qmax)
  xq = jnp.maximum(2.0 ** (-(jnp.clip(q, qmin, qmax) - zero) * scale) - shift, 0.0)
  return jnp.where(inside, x + jax.lax.stop_gradient(xq - x),
                   jax.lax.stop_gradient(xq)).astype(x.dtype)


def shift_log2_params(lo: jax.Array, hi: jax.Array, shift: jax.Array, bits: int
                      ) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) of the uniform quantizer in t = -log2(x + shift) for x in [lo, hi]."""
  t_lo = -jnp.log2(jnp.maximum(hi + shift, EPS))
  t_hi = -jnp.log2(jnp.maximum(lo + shift, EPS))
  qmin, qmax = qrange(bits)
  scale = jnp.maximum((t_hi - t_lo) / (qmax - qmin), EPS)
  zero = jnp.round(qmin - t_lo / scale)
  return scale, zero


# --- I&S-ViT's searches ------------------------------------------------------------------



def torch_quantile_plan(qs: Sequence[float], n: int) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
  """(index below, index above, weight) of each q-quantile of n sorted values, as
  torch.quantile computes them (rank q * (n - 1) and its weight in float32)."""
  rank = np.asarray(qs, np.float32) * np.float32(n - 1)
  below = np.floor(rank).astype(np.int32)
  return below, np.ceil(rank).astype(np.int32), (rank - below.astype(np.float32)).astype(
      np.float32)


def sorted_quantiles(srt: jax.Array, qs: Sequence[float]) -> jax.Array:
  """The q-quantiles (last axis of the result) of values sorted along the last axis, as
  torch.quantile computes them (linear interpolation, lerp from the nearer end, float32), so
  the searched ranges agree with I&S-ViT's to the last bit on equal inputs."""
  below, above, w = torch_quantile_plan(qs, srt.shape[-1])
  a, b = srt[..., below], srt[..., above]
  return jnp.where(w < 0.5, a + w * (b - a), b - (b - a) * (np.float32(1) - w))


def percentile_mse_search(x: jax.Array, axes: Sequence[int], bits: int,
                          candidates: Sequence[float]) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) per range: among the percentile pairs [quantile(1 - p), quantile(p)], the
  one with the smallest mean squared fake-quantization error (first on ties).

  As I&S-ViT: the range is not widened to include 0 and the zero point round(-lo / scale) is
  not clipped, so a range of positive values keeps all its levels.
  """
  axes = tuple(axes)
  keep = [a for a in range(x.ndim) if a not in axes]
  flat = jnp.moveaxis(x, keep, list(range(len(keep)))).reshape(
      tuple(x.shape[a] for a in keep) + (-1,)).astype(jnp.float32)
  qmax = 2 ** check_bits(bits) - 1
  k = len(candidates)
  ends = sorted_quantiles(jnp.sort(flat, axis=-1),
                          list(candidates) + [1.0 - p for p in candidates])
  hi, lo = jnp.moveaxis(ends[..., :k], -1, 0), jnp.moveaxis(ends[..., k:], -1, 0)  # (k, ranges...)
  # A constant range (all-zero activations) would divide by zero (I&S-ViT: NaN); EPS keeps
  # the state finite, as everywhere else in this module.
  s = jnp.maximum((hi - lo) / qmax, EPS)
  z = jnp.round(-lo / s)

  def err(sz):  # one candidate at a time: the program holds one copy of x
    s1, z1 = sz[0][..., None], sz[1][..., None]
    xq = (jnp.clip(jnp.round(flat / s1) + z1, 0, qmax) - z1) * s1
    return jnp.mean((flat - xq) ** 2, axis=-1)

  best = jnp.argmin(jax.lax.map(err, (s, z)), axis=0)[None]  # first minimum on ties
  return jnp.take_along_axis(s, best, 0)[0], jnp.take_along_axis(z, best, 0)[0]


def log2_torch(x: jax.Array) -> jax.Array:
  return jnp.log(x) / jnp.log(jnp.float32(2.0))  # as torch: ln(x) / ln(2), in float32


def ias_log2_quant(x: jax.Array, shift: jax.Array, lo: jax.Array, hi: jax.Array,
                   bits: int) -> jax.Array:
  """I&S-ViT's post-softmax quantizer (its `LogSqrt2Quantizer.forward`): t = log2(x + shift)
  on a uniform grid of 2^b steps over the calibrated [lo, hi] (codes 0..2^b, one level more
  than its search used), the grid value's exponent rounded to an integer, 2^e - shift. Both
  roundings straight-through, so the gradient is 2^e / (x + shift) strictly inside the grid
  and zero at its first and last code (torch.clamp with scalar bounds)."""
  n = 2 ** check_bits(bits)
  shift, lo, hi = (jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for v in (shift, lo, hi))
  step = jnp.maximum((hi - lo) / n, EPS)
  t = log2_torch(x + shift)
  code = round_ste((t - lo) / step)
  code = jnp.where((code > 0) & (code < n), code, jax.lax.stop_gradient(jnp.clip(code, 0, n)))
  return (2.0 ** round_ste(code * step + lo) - shift).astype(x.dtype)


def ias_log2_search(x: jax.Array, bits: int, shifts: Sequence[float] = LOG2_SHIFTS
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(shift, lo, hi) of `ias_log2_quant`: per candidate shift, [lo, hi] = the range of
  log2(x + shift) and the error of a 2^b - 1 step grid over it; the smallest mean squared
  error wins (first on ties)."""
  n = 2 ** check_bits(bits)
  x = jax.lax.stop_gradient(x).astype(jnp.float32)

  def candidate(b):
    t = log2_torch(x + b)
    lo, hi = jnp.min(t), jnp.max(t)
    step = jnp.maximum((hi - lo) / (n - 1), EPS)
    code = jnp.clip(jnp.round((t - lo) / step), 0, n - 1)
    xq = 2.0 ** jnp.round(code * step + lo) - b
    return jnp.mean((x - xq) ** 2), lo, hi

  shifts = jnp.asarray(shifts, jnp.float32)
  err, lo, hi = jax.lax.map(candidate, shifts)
  best = jnp.argmin(err)  # first minimum on ties
  return shifts[best], lo[best], hi[best]
