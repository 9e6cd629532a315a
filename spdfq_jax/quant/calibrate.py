"""Calibration: activation ranges from any image set (real, noise or synthetic).

`calib.order='sequential'` (I&S-ViT, the default): one forward of the first
`calib.max_images` images with FP weights in which every point, in forward order, computes
its state from its input and passes that input on quantized, so each point is calibrated on
what the quantized upstream produces (`qmodel` mode 'init').

`calib.order='fp'`: ranges observed on the FP model (FP weights, no activation quantization
upstream). Methods that combine over chunks run over all images in fixed-size chunks (one
jitted program per pass), so 32 to 1024 images at 224x224 fit on one device, and the result
does not depend on the chunk size:
  pass 1  per-range min / max                  (combined by min / max)
  pass 2  percentile: histograms over [min, max];  MSE: error per clipping candidate;
          shift-log2: error per shift candidate       (combined by sum; only when needed)
Searches over percentiles of the whole tensor (`point_stats.whole_tensor`) read the first
`calib.max_images` images at once, still with nothing quantized upstream.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spdfq_jax.models import zoo
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import point_stats
from spdfq_jax.quant import qmodel


def _chunks(images: np.ndarray, size: int):
  for i in range(0, len(images), size):
    yield images[i:i + size]


def _run(fn: Callable, images: np.ndarray, chunk_size: int, combine: Callable) -> Any:
  acc = None
  for chunk in _chunks(images, chunk_size):
    out = fn(jnp.asarray(chunk))
    acc = out if acc is None else jax.tree_util.tree_map_with_path(combine, acc, out)
  return acc


def _minmax(path, a, b):
  return jnp.minimum(a, b) if path[-1].key == "lo" else jnp.maximum(a, b)


def _sum(path, a, b):
  return a + b


@functools.partial(jax.jit, static_argnums=0)
def _pass1(module: zoo.Model, params: Any, x: jax.Array) -> dict:
  return module.apply({"params": params}, x, mutable=["calib"])[1].get("calib", {})


@functools.partial(jax.jit, static_argnums=0)
def _init(module: zoo.Model, params: Any, x: jax.Array) -> dict:
  return module.apply({"params": params}, x, mutable=["quant"])[1].get("quant", {})


@functools.partial(jax.jit, static_argnums=0)
def _pass2(module: zoo.Model, params: Any, stats: dict, x: jax.Array) -> dict:
  return module.apply({"params": params, "calib": stats}, x,
                      mutable=["calib2"])[1].get("calib2", {})


def point_specs(module: zoo.Model, cfg: ml_collections.ConfigDict, params: Any,
                images: jax.Array) -> dict[str, tuple[str, qconfig.PointSpec]]:
  """{point path: (kind, spec)} for every point of the model (found by tracing once)."""
  found = {}

  class Probe(qmodel.QuantPoint):
    def __call__(self, x):
      found[qmodel._path(self)] = (self.kind, qconfig.point_spec(self.cfg, self.kind,
                                                                 qmodel._path(self)))
      return x

  probe = zoo.with_point(module, functools.partial(
      Probe, cfg=ml_collections.FrozenConfigDict(cfg), mode="fp"))
  jax.eval_shape(lambda p, x: probe.apply({"params": p}, x), params, images[:1])
  return found


def calibrate(module: zoo.Model, params: Any, images: np.ndarray,
              cfg: ml_collections.ConfigDict, chunk_size: Optional[int] = None) -> dict:
  """The `quant` collection (scale, zero[, shift] per point) from calibration images."""
  chunk_size = chunk_size or cfg.calib.chunk_size
  images = np.asarray(images, np.float32)
  specs = point_specs(module, cfg, params, jnp.asarray(images[:1]))
  out = {}
  whole = {p for p, (_, spec) in specs.items()
           if spec.quantizer != "none" and not spec.dynamic
           and (cfg.calib.order == "sequential" or point_stats.whole_tensor(spec))}
  if whole:
    init = qmodel.quant_module(module, cfg, "init")
    state = _flat(_init(init, params, jnp.asarray(images[:cfg.calib.max_images])))
    out.update({k: v for k, v in state.items() if k.rsplit("/", 1)[0] in whole})
  rest = {p: s for p, s in specs.items() if p not in whole}
  if rest:
    out.update(_chunked(module, params, images, cfg, chunk_size, rest))
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}, sep="/")


def _chunked(module: zoo.Model, params: Any, images: np.ndarray,
             cfg: ml_collections.ConfigDict, chunk_size: int, specs: dict) -> dict:
  """Flat states of `specs`' points from statistics combined over chunks of the FP model."""
  obs = qmodel.quant_module(module, cfg, "observe")
  ref = qmodel.quant_module(module, cfg, "refine")
  stats = flax.core.unfreeze(_run(lambda x: _pass1(obs, params, x), images, chunk_size,
                                  _minmax))
  if any(_needs_pass2(spec) for _, spec in specs.values()):
    stats2 = _flat(_run(lambda x: _pass2(ref, params, stats, x), images, chunk_size, _sum))
  else:
    stats2 = {}
  flat = _flat(stats)
  out = {}
  for path, (_, spec) in specs.items():
    if path + "/lo" not in flat:
      continue  # full precision or dynamic
    s = {"lo": flat[path + "/lo"], "hi": flat[path + "/hi"]}
    s.update({k[len(path) + 1:]: v for k, v in stats2.items() if k.rsplit("/", 1)[0] == path})
    for name, value in point_stats.finalize(spec, s).items():
      out[path + "/" + name] = value
  return out


def _needs_pass2(spec: qconfig.PointSpec) -> bool:
  if spec.quantizer == "none" or spec.dynamic:
    return False
  if spec.quantizer == "shift_log2":
    return spec.shift is None
  return spec.quantizer == "uniform" and spec.method != "minmax"


def _flat(tree: Any) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
