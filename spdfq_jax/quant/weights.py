"""The weight transform: a (scale, zero) per kernel, and params with every kernel
fake-quantized. Parameter names are never changed; the state lives beside the params, nested
like them (`wquant` collection of a QuantizedModel)."""
from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp
import ml_collections

from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import quantizers as Q


def _flat(tree: Any) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _unflat(flat: dict) -> dict:
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def weight_state(params: Any, cfg: ml_collections.ConfigDict) -> dict:
  """(scale, zero) per quantized kernel (per output channel = last axis by default), nested
  like params: {...: {'kernel': {scale, zero}}}."""
  out = {}
  for path, w in _flat(params).items():
    if not path.endswith("kernel"):
      continue
    spec = qconfig.weight_spec(cfg, path)
    if spec.quantizer == "none":
      continue
    s, z = Q.quantize_tensor(jnp.asarray(w), bits=spec.bits, granularity=spec.granularity,
                             method=spec.method, symmetric=spec.symmetric,
                             pct=spec.percentile, grid=spec.grid, candidates=spec.candidates)
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
