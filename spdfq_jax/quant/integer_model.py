"""The integer model as a whole: built from an export file or a quantized model, and what
the evaluate stage runs.

`Parts` are what it is made of (the FP module, float params, activation state, integer
kernels, settings), shared with the ONNX writer (`spdfq_jax.deploy`); `build(parts)` puts
them behind the integer quant points of `quant.integer`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from spdfq_jax.models import layers, native, zoo
from spdfq_jax.quant import integer, qmodel
from spdfq_jax.quant import quantizers as Q


def _flat(tree: Any) -> dict:
  """A pytree as {'/'-joined path: leaf}, leaves as they are (0-d arrays stay 0-d)."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def unsupported(cfg: ml_collections.ConfigDict, qstate: Any) -> Optional[str]:
  """Why a quantized model has no integer path (None: it has one)."""
  if "token" in (cfg.acts.granularity, cfg.acts.post_ln_granularity):
    return "per-token activation ranges are computed on the fly"
  if cfg.softmax.quantizer == "shift_log2":
    return "the shift-log2 softmax quantizer has levels off any integer grid"
  for key, value in _flat(qstate).items():
    if key.endswith("/scale") and np.ndim(value) != 0:
      return f"{key[:-6]} has a scale per channel (set reparam=True to fold it)"
  return None


@dataclasses.dataclass
class IntegerModel:
  """The model on integers: `logits(images)`; variables 'params' (float parameters only),
  'quant' (activation quantizer state), 'int_kernels' (integer kernels)."""
  module: zoo.Model
  variables: dict
  cfg: ml_collections.ConfigDict
  in_channels: int

  def logits(self, images: jax.Array) -> jax.Array:
    return _apply(self.module, self.variables, images)

  def weight_bytes(self) -> dict:
    """Bytes held in memory: parameters and integer kernels (their scales and zeros too)."""
    count = lambda tree: sum(int(np.asarray(v).nbytes) for v in _flat(tree).values())  # noqa: E731
    return {"params": count(self.variables["params"]),
            "int_kernels": count(self.variables.get(integer.INT_KERNELS, {})),
            "quant": count(self.variables["quant"])}


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
  return module.apply(variables, images)


@dataclasses.dataclass(frozen=True)
class Parts:
  """What an integer model (or its ONNX graph) is made of: the FP module, flat float params
  (quantized kernels absent), the activation quantizer state and flat
  {kernel path: (codes int32, zero, scale)} with the quantization settings."""
  module: zoo.Model
  params: dict
  quant: dict
  kernels: dict
  cfg: ml_collections.ConfigDict

  @property
  def in_channels(self) -> int:
    every = {**self.params, **{k: codes for k, (codes, _, _) in self.kernels.items()}}
    (patch,) = [v for k, v in every.items()
                if k.startswith("patch_embed/") and k.endswith("kernel")]
    return int(np.shape(patch)[2])


def build(parts: Parts) -> IntegerModel:
  """The IntegerModel of `parts`."""
  reason = unsupported(parts.cfg, parts.quant)
  if reason is not None:
    raise ValueError(f"no integer path for this quantized model: {reason}")
  w = parts.cfg.weights
  ints = {}
  for path, (codes, zero, scale) in parts.kernels.items():
    layer = path[:-len("/kernel")]
    for k, v in integer.kernel_state(codes, zero, scale, w.bits, w.symmetric).items():
      ints[f"{layer}/{k}"] = jnp.asarray(v)
  variables = {"params": native.unflatten({k: jnp.asarray(v) for k, v in parts.params.items()}),
               "quant": jax.tree_util.tree_map(jnp.asarray, parts.quant),
               integer.INT_KERNELS: native.unflatten(ints)}
  return IntegerModel(zoo.with_point(parts.module, integer.int_point_factory(parts.cfg)), variables,
                      parts.cfg, parts.in_channels)


def quantized_parts(qm: Any) -> Parts:
  """The parts of a `QuantizedModel` (its kernels are already fake-quantized)."""
  w = qm.cfg.weights
  params, ws = _flat(qm.variables["params"]), _flat(qm.variables["wquant"])
  kernels, rest = {}, {}
  for path, value in params.items():
    if path + "/scale" in ws:
      s, z = np.asarray(ws[path + "/scale"]), np.asarray(ws[path + "/zero"])
      kernels[path] = (np.asarray(Q.to_int(value, s, z, w.bits, w.symmetric)), z, s)
    else:
      rest[path] = value
  return Parts(zoo.with_point(qm.module, layers.Point), rest, qm.variables["quant"], kernels,
               qm.cfg)


def from_quantized(qm: Any) -> IntegerModel:
  """The integer model of a `QuantizedModel`."""
  return build(quantized_parts(qm))


def export_parts(path: str) -> Parts:
  """The parts of a file `export.save` wrote, without dequantizing its kernels."""
  from spdfq_jax.quant import export  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework="numpy") as f:
    meta = json.loads((f.metadata() or {}).get(export.META_KEY, "null"))
  if meta is None:
    raise ValueError(f"{path} is not a quantized spdfq_jax export (no '{export.META_KEY}' "
                     "metadata)")
  tensors = load_file(path)
  cfg = ml_collections.ConfigDict(meta["config"])
  params, kernels = {}, {}
  for key, value in tensors.items():
    if not key.startswith("params/"):
      continue
    key = key[len("params/"):]
    info = meta["packed"].get(key)
    if info is None:
      params[key] = value
      continue
    if info["packing"] == "int4x2":
      offset = 2 ** (info["bits"] - 1) if info["symmetric"] else 0
      codes = export.unpack_int4(value, tuple(info["shape"])).astype(np.int32) - offset
    else:
      codes = value.astype(np.int32).reshape(info["shape"])
    shapes = meta["scale_shapes"]
    kernels[key] = (codes, tensors[f"wquant/{key}/zero"].reshape(shapes[key + "/zero"]),
                    tensors[f"wquant/{key}/scale"].reshape(shapes[key + "/scale"]))
  quant = native.unflatten({k[len("quant/"):]: v for k, v in tensors.items()
                            if k.startswith("quant/")})
  return Parts(native.rebuild(meta), params, quant, kernels, cfg)


def load(path: str) -> IntegerModel:
  """The integer model of a file `export.save` wrote."""
  return build(export_parts(path))


def eval_logits(qm: Any, use_integer: bool) -> tuple[Callable[[jax.Array], jax.Array], str]:
  """What the evaluate stage runs on a quantized model, and which path that is: 'integer',
  or 'fake-quant' with the reason (eval.integer off, or no integer path)."""
  if not use_integer:
    return qm.logits, "fake-quant (eval.integer off)"
  if not isinstance(qm, qmodel.QuantizedModel):
    return qm.logits, f"fake-quant ({type(qm).__name__} has no integer path)"
  reason = unsupported(qm.cfg, qm.variables["quant"])
  if reason is not None:
    return qm.logits, f"fake-quant ({reason})"
  return from_quantized(qm).logits, "integer"
