"""Export of a quantized model as integers, and an integer path for linear layers.

File: one .safetensors. Quantized kernels are stored as their integers: one per byte
(uint8, or int8 when symmetric) for 5..8 bits, two per byte (low nibble first) for 2..4
bits, beside a float32 scale and zero point per output channel. Everything else (biases,
LayerNorm, tokens, activation quantizer state) is float32. The metadata holds the
architecture (as `models.native`) and the quantization config, so `load` rebuilds the
same fake-quant model: dequantized kernels re-quantize to themselves, so logits match.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from spdfq_jax import checkpoint
from spdfq_jax.models import native
from spdfq_jax.quant import qmodel
from spdfq_jax.quant import quantizers as Q

META_KEY = "spdfq_jax_quant"


def _flat(tree: Any) -> dict:
  return {k: np.asarray(jax.device_get(v)) for k, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/").items()}


def pack_int4(q: np.ndarray) -> np.ndarray:
  """Unsigned 4-bit values (0..15) -> bytes, two per byte, low nibble first."""
  flat = q.reshape(-1).astype(np.uint8)
  if flat.size % 2:
    flat = np.concatenate([flat, np.zeros(1, np.uint8)])
  return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  out = np.empty(packed.size * 2, np.uint8)
  out[0::2], out[1::2] = packed & 0x0F, packed >> 4
  return out[:int(np.prod(shape))].reshape(shape)


def _encode(q: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, str]:
  if bits <= 4:
    offset = 2 ** (bits - 1) if symmetric else 0  # nibbles are unsigned
    return pack_int4(q + offset), "int4x2"
  return (q.astype(np.int8) if symmetric else q.astype(np.uint8)), "int8"


def _decode(data: np.ndarray, info: dict) -> np.ndarray:
  if info["packing"] == "int4x2":
    offset = 2 ** (info["bits"] - 1) if info["symmetric"] else 0
    return unpack_int4(data, tuple(info["shape"])).astype(np.int32) - offset
  return data.astype(np.int32)


def save(path: str, qm: qmodel.QuantizedModel) -> dict:
  """Writes the integer export; returns its size report (`sizes`)."""
  w = qm.cfg.weights
  params, ws = _flat(qm.variables["params"]), _flat(qm.variables["wquant"])
  tensors, packed = {}, {}
  for key, value in params.items():
    if key + "/scale" in ws:
      s, z = ws[key + "/scale"], ws[key + "/zero"]
      q = np.asarray(Q.to_int(value, s, z, w.bits, w.symmetric))
      tensors["params/" + key], packing = _encode(q, w.bits, w.symmetric)
      packed[key] = {"shape": list(value.shape), "bits": w.bits, "symmetric": w.symmetric,
                     "packing": packing}
      tensors["wquant/" + key + "/scale"] = np.asarray(s, np.float32).reshape(-1)
      tensors["wquant/" + key + "/zero"] = np.asarray(z, np.float32).reshape(-1)
    else:
      tensors["params/" + key] = np.asarray(value, np.float32)
  for key, value in _flat(qm.variables["quant"]).items():
    tensors["quant/" + key] = np.asarray(value, np.float32)
  meta = {**native.describe(qm.module), "config": qm.cfg.to_dict(), "packed": packed,
          "scale_shapes": {k: list(np.shape(v)) for k, v in ws.items()}}
  with checkpoint.atomic_path(path) as tmp:
    save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
  return sizes(qm, path)


def load(path: str) -> qmodel.QuantizedModel:
  """The fake-quant model a `save` wrote."""
  with safe_open(path, framework="numpy") as f:
    meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
  if meta is None:
    raise ValueError(f"{path} is not a quantized spdfq_jax export (no '{META_KEY}' metadata)")
  tensors = load_file(path)
  cfg = ml_collections.ConfigDict(meta["config"])
  shapes = meta["scale_shapes"]
  ws = {k[len("wquant/"):]: v.reshape(shapes[k[len("wquant/"):]])
        for k, v in tensors.items() if k.startswith("wquant/")}
  params = {}
  for key, value in tensors.items():
    if not key.startswith("params/"):
      continue
    key = key[len("params/"):]
    if key in meta["packed"]:
      q = _decode(value, meta["packed"][key])
      value = ((q - ws[key + "/zero"]) * ws[key + "/scale"]).astype(np.float32)
    params[key] = value
  quant = {k[len("quant/"):]: v for k, v in tensors.items() if k.startswith("quant/")}
  unflat = lambda d: flax.traverse_util.unflatten_dict(  # noqa: E731
      {k: jnp.asarray(v) for k, v in d.items()}, sep="/")
  module = native.rebuild(meta)
  variables = {"params": unflat(params), "quant": unflat(quant), "wquant": unflat(ws)}
  return qmodel.QuantizedModel(qmodel.quant_module(module, cfg), variables, cfg)


def sizes(qm: qmodel.QuantizedModel, path: Optional[str] = None) -> dict:
  """Bytes of the params in FP32 against the integer export (tensor payload, and the file)."""
  w = qm.cfg.weights
  params, ws = _flat(qm.variables["params"]), _flat(qm.variables["wquant"])
  fp32 = sum(4 * v.size for v in params.values())
  quant = 0
  for key, value in params.items():
    if key + "/scale" in ws:
      quant += (value.size + 1) // 2 if w.bits <= 4 else value.size
      quant += 4 * (ws[key + "/scale"].size + ws[key + "/zero"].size)
    else:
      quant += 4 * value.size
  quant += sum(4 * v.size for v in _flat(qm.variables["quant"]).values())
  out = {"fp32_bytes": int(fp32), "quant_bytes": int(quant), "ratio": fp32 / quant}
  if path is not None:
    out["file_bytes"] = os.path.getsize(path)
  return out


# --- integer inference -------------------------------------------------------------------

def int_dense(x: jax.Array, a_scale: jax.Array, a_zero: jax.Array, a_bits: int,
              w_int: jax.Array, w_scale: jax.Array, w_zero: jax.Array, w_bits: int,
              bias: Optional[jax.Array] = None, w_symmetric: bool = False) -> jax.Array:
  """A linear layer on integers: quantized input (per-tensor scale, zero) times a
  quantized kernel (per output channel), int8 operands, int32 accumulation.

  Asymmetric codes 0..2^b-1 are recentred by 2^(b-1) into int8, and the zero points are
  handled by the usual correction terms:
    sum_k (a_k - za)(w_k - zw) = sum a w - zw sum a - za sum w + K za zw.
  Agrees with `fake_quant(x) @ fake_quant(W) + b` up to float rounding.
  """
  qa = Q.to_int(x, a_scale, a_zero, a_bits) - 2 ** (a_bits - 1)
  za = jnp.round(a_zero).astype(jnp.int32) - 2 ** (a_bits - 1)
  w_off = 0 if w_symmetric else 2 ** (w_bits - 1)
  qw = w_int.astype(jnp.int32) - w_off
  zw = jnp.round(w_zero).astype(jnp.int32) - w_off
  a8, w8 = qa.astype(jnp.int8), qw.astype(jnp.int8)
  acc = jax.lax.dot_general(a8, w8, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  sum_a = jnp.sum(qa, axis=-1, keepdims=True)
  sum_w = jnp.sum(qw, axis=0)
  k = x.shape[-1]
  acc = acc - zw * sum_a - za * sum_w + k * za * zw
  y = acc.astype(jnp.float32) * (a_scale * w_scale)
  return y if bias is None else y + bias
