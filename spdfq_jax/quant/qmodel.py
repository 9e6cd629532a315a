"""The fake-quantized model: quant points for activations, a params transform for weights.

Activations: `point_factory(cfg, mode)` is passed to a zoo model through `zoo.with_point`.
Each point resolves its spec from its kind and its path, and
  mode 'quant'   fake-quantizes with the state in the `quant` collection
                 (`scale`, `zero`, and `shift` for shift-log2), per-token points on the fly;
  mode 'fp'      is the identity (the FP model, bit for bit);
  mode 'observe' records range statistics (`calib` collection) without changing x;
  mode 'refine'  reads the observed ranges and records second-pass statistics
                 (histograms for percentiles, errors per clipping candidate for MSE).
Weights: `weight_state(params, cfg)` holds a (scale, zero) per kernel (per output channel =
last axis), in the `wquant` collection; `quantize_weights` fake-quantizes every kernel leaf.
Parameter names are never changed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spdfq_jax.models import zoo
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import quantizers as Q

MODES = ("quant", "fp", "observe", "refine")
NBINS = 2048  # histogram bins per range for percentile calibration
SHIFT_CANDIDATES = tuple(2.0 ** -k for k in range(2, 13))


def mse_ratios(spec: qconfig.PointSpec) -> np.ndarray:
  """Clipping candidates (fractions of the observed range) for the MSE search."""
  return np.linspace(0.1, 1.0, spec.grid, dtype=np.float32)


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


class QuantPoint(nn.Module):
  """A quant point (same call signature as `layers.Point`)."""
  kind: str
  cfg: ml_collections.FrozenConfigDict
  mode: str = "quant"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    spec = qconfig.point_spec(self.cfg, self.kind, _path(self))
    if spec.quantizer == "none" or self.mode == "fp" or spec.dynamic and self.mode != "quant":
      return x
    if self.mode == "observe":
      for name, value in observe(spec, x).items():
        self.put_variable("calib", name, value)
      return x
    if self.mode == "refine":
      lo, hi = self.get_variable("calib", "lo"), self.get_variable("calib", "hi")
      for name, value in refine(spec, x, lo, hi).items():
        self.put_variable("calib2", name, value)
      return x
    if spec.dynamic:
      return Q.dynamic_fake_quant(x, spec.bits, spec.symmetric, "token")
    scale = self.get_variable("quant", "scale")
    if scale is None:
      raise ValueError(f"quant point {_path(self)!r} has no calibrated state: run "
                       "calibrate() first, or use mode='fp'")
    return apply_point(spec, x, {k: self.get_variable("quant", k)
                                 for k in ("scale", "zero", "shift")})


def apply_point(spec: qconfig.PointSpec, x: jax.Array, state: dict) -> jax.Array:
  """Fake-quantizes x with one point's state."""
  if spec.quantizer == "log2":
    return Q.log2_quant(x, state["scale"], spec.bits)
  if spec.quantizer == "log_sqrt2":
    return Q.log2_quant(x, state["scale"], spec.bits, step=0.5)
  if spec.quantizer == "shift_log2":
    return Q.shift_log2_quant(x, state["scale"], state["zero"], state["shift"], spec.bits)
  return Q.fake_quant(x, state["scale"], state["zero"], spec.bits, spec.symmetric)


def observe(spec: qconfig.PointSpec, x: jax.Array) -> dict:
  """First-pass statistics of one chunk: per-range min and max (combined by min/max)."""
  lo, hi = Q.minmax_range(x, Q.reduce_axes(x.ndim, spec.granularity))
  return {"lo": lo, "hi": hi}


def refine(spec: qconfig.PointSpec, x: jax.Array, lo: jax.Array, hi: jax.Array) -> dict:
  """Second-pass statistics of one chunk (summed over chunks), given the global [lo, hi]."""
  axes = Q.reduce_axes(x.ndim, spec.granularity)
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


def point_factory(cfg: ml_collections.ConfigDict, mode: str = "quant") -> Callable[..., nn.Module]:
  """The factory `zoo.with_point` takes: QuantPoint bound to these settings and mode."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  frozen = cfg if isinstance(cfg, ml_collections.FrozenConfigDict) else (
      ml_collections.FrozenConfigDict(cfg))
  return _factory(frozen, mode)


@functools.lru_cache(maxsize=256)
def _factory(frozen: ml_collections.FrozenConfigDict, mode: str) -> Callable[..., nn.Module]:
  # One factory object per (settings, mode): equal settings give equal (hashable) modules,
  # so jitted functions that take the module as a static argument compile once.
  return functools.partial(QuantPoint, cfg=frozen, mode=mode)


@functools.partial(jax.jit, static_argnums=0)
def apply_jit(module: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
  """module.apply, compiled once per (module, shapes)."""
  return module.apply(variables, images)


def quant_module(module: zoo.Model, cfg: ml_collections.ConfigDict, mode: str = "quant"
                 ) -> zoo.Model:
  """`module` with quant points in `mode`."""
  return zoo.with_point(module, point_factory(cfg, mode))


# --- weights -----------------------------------------------------------------------------

def _flat(tree: Any) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _unflat(flat: dict) -> dict:
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def weight_state(params: Any, cfg: ml_collections.ConfigDict) -> dict:
  """(scale, zero) per quantized kernel, nested like params: {...: {'kernel': {scale, zero}}}."""
  out = {}
  for path, w in _flat(params).items():
    if not path.endswith("kernel"):
      continue
    spec = qconfig.weight_spec(cfg, path)
    if spec.quantizer == "none":
      continue
    s, z = Q.quantize_tensor(jnp.asarray(w), bits=spec.bits, granularity=spec.granularity,
                             method=spec.method, symmetric=spec.symmetric,
                             pct=spec.percentile, grid=spec.grid)
    out[path + "/scale"], out[path + "/zero"] = s, z
  return _unflat(out)


def quantize_weights(params: Any, wstate: dict, cfg: ml_collections.ConfigDict) -> dict:
  """params with every kernel in `wstate` fake-quantized (straight-through gradients).

  Idempotent: quantizing already quantized kernels with the same state changes nothing.
  """
  w = cfg.weights
  flat, ws = _flat(params), _flat(wstate)
  out = {}
  for path, value in flat.items():
    if path + "/scale" in ws:
      value = Q.fake_quant(value, ws[path + "/scale"], ws[path + "/zero"], w.bits, w.symmetric)
    out[path] = value
  return _unflat(out)


# --- the quantized model -----------------------------------------------------------------

@dataclasses.dataclass
class QuantizedModel:
  """A fake-quantized model: `module.apply(variables, images)` gives its logits.

  variables: 'params' (kernels already fake-quantized), 'quant' (activation quantizer
  state), 'wquant' (weight scales and zero points, used by export).
  """
  module: zoo.Model
  variables: dict
  cfg: ml_collections.ConfigDict
  info: dict = dataclasses.field(default_factory=dict)
  timings: dict = dataclasses.field(default_factory=dict)  # seconds per stage of `quantize`

  def logits(self, images: jax.Array, variables: Optional[dict] = None) -> jax.Array:
    return apply_jit(self.module, self.variables if variables is None else variables, images)


def build(module: zoo.Model, params: Any, qstate: dict, wstate: dict,
          cfg: ml_collections.ConfigDict) -> QuantizedModel:
  """A QuantizedModel from an FP module, (latent) params and quantizer states."""
  variables = {"params": quantize_weights(params, wstate, cfg), "quant": qstate,
               "wquant": wstate}
  return QuantizedModel(quant_module(module, cfg), variables, cfg)
