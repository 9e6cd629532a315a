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
  """Uniform fake quantization; scale/zero broadcast against x (shape () or (C,))."""
  qmin, qmax = qrange(bits, symmetric)
  scale = jax.lax.stop_gradient(scale)
  zero = jax.lax.stop_gradient(zero)
  v = jax.lax.stop_gradient(x) / scale + zero
  xq = (jnp.clip(jnp.round(v), qmin, qmax) - zero) * scale
  inside = (v >= qmin) & (v <= qmax)
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
                                             "pct", "grid"))
def quantize_tensor(x: jax.Array, bits: int, granularity: str = "channel",
                    method: str = "minmax", symmetric: bool = False, pct: float = 99.99,
                    grid: int = 20) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) for a whole tensor known in advance (weights), shaped for broadcasting
  against the last axis: () per tensor, (C,) per channel."""
  if granularity == "token":
    raise ValueError("per-token ranges are dynamic; use dynamic_fake_quant")
  axes = reduce_axes(x.ndim, granularity)
  if method == "minmax":
    lo, hi = minmax_range(x, axes)
  elif method == "percentile":
    lo, hi = percentile_range(x, axes, pct)
  elif method == "mse":
    lo, hi = mse_range(x, axes, bits, symmetric, grid)
  else:
    raise ValueError(f"range method must be 'minmax', 'percentile' or 'mse', got {method!r}")
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
