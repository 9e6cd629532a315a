"""The fake-quantized model: quant points that apply a state to activations.

`point_factory(cfg, mode)` is passed to a zoo model through `zoo.with_point`. Each point
resolves its spec from its kind and its path, and
  mode 'quant'   fake-quantizes with its state in the `quant` collection (`scale`, `zero`;
                 `shift` for shift-log2; `shift`, `lo`, `hi` for ias_log2), per-token points
                 on the fly;
  mode 'fp'      is the identity (the FP model, bit for bit);
  mode 'init'    computes its state from x (`point_stats.init_state`), stores it in `quant`
                 and returns x quantized with it (I&S-ViT's lazy initialisation: downstream
                 points see quantized inputs);
  mode 'observe' / 'refine'  record chunked calibration statistics (`point_stats`).
Weights are quantized by a params transform (`weights.py`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import ml_collections

from spdfq_jax.models import zoo
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import point_stats
from spdfq_jax.quant import quantizers as Q
from spdfq_jax.quant import weights

MODES = ("quant", "fp", "observe", "refine", "init")


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
      for name, value in point_stats.observe(spec, x).items():
        self.put_variable("calib", name, value)
      return x
    if self.mode == "refine":
      lo, hi = self.get_variable("calib", "lo"), self.get_variable("calib", "hi")
      for name, value in point_stats.refine(spec, x, lo, hi).items():
        self.put_variable("calib2", name, value)
      return x
    if spec.dynamic:
      return Q.dynamic_fake_quant(x, spec.bits, spec.symmetric, "token")
    if self.mode == "init":
      state = point_stats.init_state(spec, x)
      for name, value in state.items():
        self.put_variable("quant", name, value)
      return apply_point(spec, x, state) if self.cfg.calib.order == "sequential" else x
    state = {k: self.get_variable("quant", k) for k in STATE_KEYS if self.has_variable("quant", k)}
    if not state:
      raise ValueError(f"quant point {_path(self)!r} has no calibrated state: run "
                       "calibrate() first, or use mode='fp'")
    return apply_point(spec, x, state)


STATE_KEYS = ("scale", "zero", "shift", "lo", "hi")


def apply_point(spec: qconfig.PointSpec, x: jax.Array, state: dict) -> jax.Array:
  """Fake-quantizes x with one point's state."""
  if spec.quantizer == "ias_log2":
    return Q.ias_log2_quant(x, state["shift"], state["lo"], state["hi"], spec.bits)
  if spec.quantizer == "log2":
    return Q.log2_quant(x, state["scale"], spec.bits)
  if spec.quantizer == "log_sqrt2":
    return Q.log2_quant(x, state["scale"], spec.bits, step=0.5)
  if spec.quantizer == "shift_log2":
    return Q.shift_log2_quant(x, state["scale"], state["zero"], state["shift"], spec.bits)
  return Q.fake_quant(x, state["scale"], state["zero"], spec.bits, spec.symmetric)


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
  variables = {"params": weights.quantize_weights(params, wstate, cfg), "quant": qstate,
               "wquant": wstate}
  return QuantizedModel(quant_module(module, cfg), variables, cfg)
