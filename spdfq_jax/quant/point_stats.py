"""Calibration statistics of one activation quant point: what calibration computes from the
tensors a point sees, and the point's state from them.

Two routes (`calib.order`, docs/quantization.md Q1):
  `init_state`   the state from the whole tensor at once (I&S-ViT's lazy initialisation; with
                 order 'sequential' the tensor comes from the already-quantized upstream);
  `observe` -> `refine` -> `finalize`   chunked statistics combined across chunks, for the
                 methods that allow it (min/max, histogram percentile, MSE over shrink ratios).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import quantizers as Q

NBINS = 2048  # histogram bins per range for percentile calibration
SHIFT_CANDIDATES = tuple(2.0 ** -k for k in range(2, 13))


def mse_ratios(spec: qconfig.PointSpec) -> np.ndarray:
  """Clipping candidates (fractions of the observed range) for the MSE search."""
  return np.linspace(0.1, 1.0, spec.grid, dtype=np.float32)


def whole_tensor(spec: qconfig.PointSpec) -> bool:
  """Whether the point's state needs the whole calibration tensor at once (no chunking)."""
  return spec.quantizer == "ias_log2" or (spec.quantizer == "uniform"
                                          and spec.method == "percentile_mse")


def init_state(spec: qconfig.PointSpec, x: jax.Array) -> dict:
  """The point's state from the whole tensor x (every quantizer, every method)."""
  x = jax.lax.stop_gradient(x)
  if spec.quantizer == "ias_log2":
    shift, lo, hi = Q.ias_log2_search(x, spec.bits)
    return {"shift": shift, "lo": lo, "hi": hi}
  axes = Q.reduce_axes(x.ndim, spec.granularity)
  if spec.quantizer == "uniform" and spec.method == "percentile_mse":
    s, z = Q.percentile_mse_search(x, axes, spec.bits, spec.candidates)
    return {"scale": s, "zero": z}
  stats = observe(spec, x)
  stats.update(refine(spec, x, stats["lo"], stats["hi"]))
  return finalize(spec, stats)


def observe(spec: qconfig.PointSpec, x: jax.Array) -> dict:
  """First-pass statistics of one chunk: per-range min and max (combined by min/max)."""
  lo, hi = Q.minmax_range(x, Q.reduce_axes(x.ndim, spec.granularity))
  return {"lo": lo, "hi": hi}


def refine(spec: qconfig.PointSpec, x: jax.Array, lo: jax.Array, hi: jax.Array) -> dict:
  """Second-pass statistics of one chunk (summed over chunks), given the global [lo, hi]."""
  axes = Q.reduce_axes(x.ndim, spec.granularity)
  if whole_tensor(spec):
    return {}
  if spec.quantizer == "shift_log2":
    if spec.shift is not None:
      return {}
    def err(eta):
      s, z = Q.shift_log2_params(lo, hi, eta, spec.bits)
      return jnp.sum((x - Q.shift_log2_quant(x, s, z, eta, spec.bits)) ** 2)
    return {"err": jax.lax.map(err, jnp.asarray(SHIFT_CANDIDATES, jnp.float32))}
  if spec.quantizer in ("log2", "log_sqrt2") or spec.method == "minmax":
    return {}
  if spec.method == "mse":
    return {"err": jax.lax.map(
        lambda r: Q.quant_error(x, axes, lo * r, hi * r, spec.bits, spec.symmetric),
        jnp.asarray(mse_ratios(spec)))}
  # percentile: histogram of x over [lo, hi] per range
  keep = [a for a in range(x.ndim) if a not in axes]
  flat = jnp.moveaxis(x, keep, list(range(len(keep)))).reshape(int(np.prod(lo.shape)), -1)
  lo_f, hi_f = lo.reshape(-1, 1), hi.reshape(-1, 1)
  idx = jnp.clip(((flat - lo_f) / jnp.maximum(hi_f - lo_f, Q.EPS) * NBINS).astype(jnp.int32),
                 0, NBINS - 1)
  idx = idx + NBINS * jnp.arange(flat.shape[0])[:, None]
  hist = jnp.zeros(flat.shape[0] * NBINS, jnp.float32).at[idx.reshape(-1)].add(1.0)
  return {"hist": hist.reshape(lo.shape + (NBINS,))}


def finalize(spec: qconfig.PointSpec, stats: dict) -> dict:
  """The point's quant state from its combined statistics."""
  lo, hi = stats["lo"], stats["hi"]
  if spec.quantizer in ("log2", "log_sqrt2"):
    return {"scale": jnp.maximum(hi, Q.EPS)}
  if spec.quantizer == "shift_log2":
    shift = (jnp.float32(spec.shift) if spec.shift is not None
             else jnp.asarray(SHIFT_CANDIDATES, jnp.float32)[jnp.argmin(stats["err"])])
    s, z = Q.shift_log2_params(lo, hi, shift, spec.bits)
    return {"scale": s, "zero": z, "shift": shift}
  if spec.method == "mse":
    r = jnp.asarray(mse_ratios(spec))[jnp.argmin(stats["err"], axis=0)]
    lo, hi = lo * r, hi * r
  elif spec.method == "percentile":
    lo, hi = hist_percentile(stats["hist"], lo, hi, spec.percentile)
  s, z = Q.scale_zero(lo, hi, spec.bits, spec.symmetric)
  return {"scale": s, "zero": z}


def hist_percentile(hist: jax.Array, lo: jax.Array, hi: jax.Array, pct: float
                    ) -> tuple[jax.Array, jax.Array]:
  """(100 - pct)-th and pct-th percentiles from histograms over [lo, hi] (bin edges)."""
  cdf = jnp.cumsum(hist, axis=-1)
  total = cdf[..., -1:]
  width = (hi - lo) / NBINS
  i_lo = jnp.argmax(cdf >= total * (1.0 - pct / 100.0), axis=-1)
  i_hi = jnp.argmax(cdf >= total * (pct / 100.0), axis=-1)
  return lo + i_lo * width, lo + (i_hi + 1) * width
