"""Integer inference: the quantized model on integer codes, end to end.

The same Flax modules run with another quant-point factory (`int_point_factory`): each
point quantizes its input once and returns the integer codes (`IntCodes`, or `LogCodes`
after the softmax) instead of a float array; the layer it feeds (`layers.Dense`,
`layers.Conv`, `layers.einsum`) hands the codes back to them, and they compute the layer
on int8 operands with int32 accumulation:

  sum_k (a_k - za_k)(w_kn - zw_n) = sum_k a_k w_kn - zw_n sum_k a_k - sum_k za_k w_kn
                                    + zw_n sum_k za_k,

then one float multiply by the two scales (the requantization scale) and the bias. Swin's
patch-merging input keeps an integer zero point per channel (see `reparam`); the terms
above take it as they take a scalar one. The patch embedding is a matmul over patches.
LayerNorm, softmax, GELU, residual adds and the requantization scales stay float, as in
the fake-quant model, whose logits this model reproduces to float rounding.

Post-softmax attention (log2, or log-sqrt2: 2^(-e/2)) feeds `attn @ v` as int8 codes: a
level 2^-f is 2^(8c+7-f) / 2^(8c+7) for the chunk c = f // 8 of eight exponents, and
2^(8c+7-f) - 1 is in 0..127, an int8 code with zero point -1; one int8 matmul per chunk
(and, for log-sqrt2, per parity of e: odd levels carry a float factor 2^-1/2) sums to the
exact result. Exponents f above `MAX_EXPONENT` (levels below 2^-32 of the top one, far
under float32 resolution of the sum) are dropped, so at most four chunks run.

Kernels live in the `int_kernels` collection as int8 codes (5-8 bits) or packed two per
byte (2-4 bits, unpacked inside the compiled function) with an int32 zero point and a
float32 scale per output channel; no float copy of a quantized kernel is kept.
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
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import quantizers as Q

INT_KERNELS = "int_kernels"
# Attention matmuls on the integer codes held in float32, where every partial sum is an
# integer below 2^24 and so exact: the same int32 result, at float GEMM speed (XLA's
# batched int8 dot is slower than its float one on CPUs). Off: int8 operands, as specified.
EXACT_FLOAT32_ATTENTION = False
MAX_EXPONENT = 31  # log-domain levels 2^-f with f above this are dropped (< 2^-32)
CHUNK = 8  # exponents per int8 chunk of the attention probabilities

# Linear layer -> the quant point that feeds it (last path component; a Swin's patch
# projection sits one level deeper, `patch_embed/proj`, and is fed by `patch_in`).
LAYER_INPUT = {"qkv": "qkv_in", "proj": "proj_in", "fc1": "fc1_in", "fc2": "fc2_in",
               "reduction": "reduction_in", "head": "head_in", "head_dist": "head_dist_in"}


def _flat(tree: Any) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _unflat(flat: dict) -> dict:
  return flax.traverse_util.unflatten_dict(flat, sep="/")


# --- integer matmuls ---------------------------------------------------------------------

def _int_kernel(layer: nn.Module, rows: int) -> Optional[tuple[jax.Array, jax.Array, jax.Array]]:
  """(codes int8 (rows, N), zero int32, scale float32) of the layer, None if it is float."""
  if layer.has_variable(INT_KERNELS, "codes"):
    codes = layer.get_variable(INT_KERNELS, "codes")
  elif layer.has_variable(INT_KERNELS, "packed"):
    codes = unpack_rows(layer.get_variable(INT_KERNELS, "packed"), layer.features)
  else:
    return None
  if codes.shape[0] != rows:
    raise ValueError(f"{'/'.join(layer.path)}: integer kernel has {codes.shape[0]} rows, the "
                     f"input {rows} features")
  return (codes, layer.get_variable(INT_KERNELS, "zero"),
          layer.get_variable(INT_KERNELS, "scale"))


def int_matmul(codes: jax.Array, zero: jax.Array, w: jax.Array, w_zero: jax.Array
               ) -> jax.Array:
  """sum_k (a_k - za_k)(w_kn - zw_n) in int32, from int8 operands (a: (..., K), w: (K, N))."""
  acc = jax.lax.dot_general(codes, w, (((codes.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  sum_a = jnp.sum(codes, axis=-1, keepdims=True, dtype=jnp.int32)
  sum_w = jnp.sum(w, axis=0, dtype=jnp.int32)
  if jnp.ndim(zero) == 0:
    const = -zero * sum_w + codes.shape[-1] * zero * w_zero
  else:  # an integer zero point per input channel
    const = -jnp.dot(zero, w.astype(jnp.int32)) + jnp.sum(zero) * w_zero
  return acc - w_zero * sum_a + const


def _axes_to(x: jax.Array, letters: str, out: str) -> jax.Array:
  """x, whose axes are `letters` (a subset of `out`'s), transposed and expanded to `out`."""
  kept = "".join(c for c in out if c in letters)
  x = jnp.einsum(f"{letters}->{kept}", x)
  return x.reshape([x.shape[kept.index(c)] if c in kept else 1 for c in out])


def int_einsum(spec: str, a: "IntCodes", b: "IntCodes") -> jax.Array:
  """einsum of two dequantized operands, on their int8 codes (scalar zero points)."""
  ins, out = spec.split("->")
  la, lb = ins.split(",")
  contracted = [c for c in la if c in lb and c not in out]
  size = int(np.prod([a.codes.shape[la.index(c)] for c in contracted]))
  if EXACT_FLOAT32_ATTENTION and size * 128 * 128 < 2 ** 24:
    acc = jnp.einsum(spec, a.codes.astype(jnp.float32), b.codes.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)
  else:
    acc = jnp.einsum(spec, a.codes, b.codes, preferred_element_type=jnp.int32)
  def summed(x, letters):
    axes = tuple(letters.index(c) for c in contracted)
    rest = "".join(c for c in letters if c not in contracted)
    return _axes_to(jnp.sum(x, axis=axes, dtype=jnp.int32), rest, out)
  acc = (acc - b.zero * summed(a.codes, la) - a.zero * summed(b.codes, lb)
         + size * a.zero * b.zero)
  return acc.astype(jnp.float32) * (a.scale * b.scale)


# --- what the points return --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IntCodes(layers.Encoded):
  """A uniformly quantized activation: x ~ (codes - zero) * scale, codes int8."""
  codes: jax.Array  # int8
  zero: jax.Array   # int32, () or (channels,)
  scale: jax.Array  # float32 ()

  def dequantize(self) -> jax.Array:
    return (self.codes.astype(jnp.int32) - self.zero).astype(jnp.float32) * self.scale

  def dense(self, layer: nn.Module) -> jax.Array:
    rows = self.codes.shape[-1]
    kernel = _int_kernel(layer, rows)
    if kernel is None:  # the layer is kept in full precision: its input is dequantized
      w = layer.param("kernel", layer.kernel_init, (rows, layer.features), layer.param_dtype)
      y = jnp.dot(self.dequantize(), w)
    else:
      w, w_zero, w_scale = kernel
      y = int_matmul(self.codes, self.zero, w, w_zero).astype(jnp.float32) * (
          self.scale * w_scale)
    if layer.use_bias:
      y = y + layer.param("bias", layer.bias_init, (layer.features,), layer.param_dtype)
    return y

  def conv(self, layer: nn.Module) -> jax.Array:
    """A patch projection (stride = kernel size, no padding) as a matmul over patches."""
    ph, pw = layer.kernel_size
    if tuple(np.broadcast_to(layer.strides, 2)) != (ph, pw) or layer.padding != "VALID":
      raise ValueError(f"{'/'.join(layer.path)}: integer convolution needs stride = kernel "
                       "size and VALID padding (a patch projection)")
    b, h, w, c = self.codes.shape
    patches = self.codes.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // ph, w // pw, ph * pw * c)
    zero = self.zero if jnp.ndim(self.zero) == 0 else jnp.tile(self.zero, ph * pw)
    return IntCodes(patches, zero, self.scale).dense(layer)

  def einsum(self, spec: str, other: Any, lhs: bool) -> jax.Array:
    if not isinstance(other, layers.Encoded):  # the other operand is kept in full precision
      x = self.dequantize()
      return jnp.einsum(spec, x, other) if lhs else jnp.einsum(spec, other, x)
    if isinstance(other, LogCodes):
      return other.einsum(spec, self, not lhs)
    return int_einsum(spec, self, other) if lhs else int_einsum(spec, other, self)


@dataclasses.dataclass(frozen=True)
class LogCodes(layers.Encoded):
  """Log-domain attention probabilities: x ~ scale * 2^(-step * e) where `inside`, else 0."""
  e: jax.Array       # int32 exponents in 0..levels-1
  inside: jax.Array  # bool
  scale: jax.Array   # float32 ()
  step: float        # 1 (log2) or 0.5 (log-sqrt2)
  levels: int

  def dequantize(self) -> jax.Array:
    return jnp.where(self.inside, self.scale * 2.0 ** (-self.step * self.e), 0.0)

  def chunks(self) -> list[IntCodes]:
    """Int8 operands whose dequantized sum is these probabilities (module docstring)."""
    groups = [(self.e, jnp.float32(1.0), self.inside)] if self.step == 1.0 else [
        (self.e // 2, jnp.float32(2.0 ** -0.5) ** p, self.inside & (self.e % 2 == p))
        for p in (0, 1)]
    top = (self.levels - 1) if self.step == 1.0 else (self.levels - 1) // 2
    out = []
    for f, factor, keep in groups:
      for c in range(min(top, MAX_EXPONENT) // CHUNK + 1):
        lo = c * CHUNK
        sel = keep & (f >= lo) & (f < lo + CHUNK)
        codes = jnp.where(sel, jnp.left_shift(1, jnp.clip(lo + CHUNK - 1 - f, 0, CHUNK - 1)) - 1,
                          -1).astype(jnp.int8)
        out.append(IntCodes(codes, jnp.int32(-1),
                            self.scale * factor * jnp.float32(2.0 ** -(lo + CHUNK - 1))))
    return out

  def einsum(self, spec: str, other: Any, lhs: bool) -> jax.Array:
    if not isinstance(other, IntCodes):  # v kept in full precision
      x = self.dequantize()
      return jnp.einsum(spec, x, other) if lhs else jnp.einsum(spec, other, x)
    parts = [int_einsum(spec, c, other) if lhs else int_einsum(spec, other, c)
             for c in self.chunks()]
    return functools.reduce(jnp.add, parts)


def encode(spec: qconfig.PointSpec, x: jax.Array, state: dict) -> layers.Encoded:
  """The codes of x under one point's quantizer (the same rounding as fake quantization)."""
  if spec.quantizer in ("log2", "log_sqrt2"):
    step = 1.0 if spec.quantizer == "log2" else 0.5
    levels = 2 ** spec.bits
    scale = state["scale"]
    e = jnp.round(-jnp.log2(jnp.maximum(x / scale, 2.0 ** -(step * levels + 2))) / step)
    return LogCodes(jnp.clip(e, 0, levels - 1).astype(jnp.int32), e < levels, scale, step,
                    levels)
  if spec.quantizer != "uniform":
    raise ValueError(f"no integer path for the {spec.quantizer!r} quantizer")
  qmin, qmax = Q.qrange(spec.bits, spec.symmetric)
  scale, zero = state["scale"], state["zero"]
  if jnp.ndim(scale) != 0:
    raise ValueError("integer inference needs one activation scale per tensor (reparam folds "
                     "per-channel scales into the LayerNorm)")
  q = jnp.clip(jnp.round(x / scale + zero), qmin, qmax).astype(jnp.int32)
  off = 0 if spec.symmetric else 2 ** (spec.bits - 1)
  return IntCodes((q - off).astype(jnp.int8), jnp.round(zero).astype(jnp.int32) - off,
                  jnp.asarray(scale, jnp.float32))


class IntPoint(nn.Module):
  """A quant point that returns integer codes (same call signature as `layers.Point`).

  Reads the state the fake-quant point calibrated (`quant` collection: scale, zero).
  """
  kind: str
  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> Any:
    path = "/".join(self.path)
    spec = qconfig.point_spec(self.cfg, self.kind, path)
    if spec.quantizer == "none":
      return x
    if spec.dynamic:
      raise ValueError(f"quant point {path!r}: per-token ranges have no integer path")
    scale = self.get_variable("quant", "scale")
    if scale is None:
      raise ValueError(f"quant point {path!r} has no calibrated state")
    return encode(spec, x, {"scale": scale, "zero": self.get_variable("quant", "zero")})


def int_point_factory(cfg: ml_collections.ConfigDict) -> Callable[..., nn.Module]:
  frozen = cfg if isinstance(cfg, ml_collections.FrozenConfigDict) else (
      ml_collections.FrozenConfigDict(cfg))
  return _factory(frozen)


@functools.lru_cache(maxsize=64)
def _factory(frozen: ml_collections.FrozenConfigDict) -> Callable[..., nn.Module]:
  return functools.partial(IntPoint, cfg=frozen)


# --- kernels -----------------------------------------------------------------------------

def pack_rows(codes: np.ndarray) -> np.ndarray:
  """(K, N) codes in 0..15 -> (K, ceil(N / 2)) bytes, low nibble first along N."""
  k, n = codes.shape
  c = np.zeros((k, n + n % 2), np.uint8)
  c[:, :n] = codes
  return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def unpack_rows(packed: jax.Array, n: int) -> jax.Array:
  """Inverse of `pack_rows`, inside the compiled function: int8 (K, n)."""
  pairs = jnp.stack([packed & 0x0F, packed >> 4], axis=-1)
  return pairs.reshape(packed.shape[0], -1)[:, :n].astype(jnp.int8)


def kernel_state(codes: np.ndarray, zero: np.ndarray, scale: np.ndarray, bits: int,
                 symmetric: bool) -> dict:
  """The `int_kernels` entry of one kernel from its integer codes (the export's `to_int`)."""
  codes = np.asarray(codes, np.int32)
  codes = codes.reshape(-1, codes.shape[-1])  # a conv kernel (HWIO) as (H*W*I, O)
  zero = np.rint(np.asarray(zero, np.float32)).astype(np.int32)
  if bits <= 4:  # unsigned nibbles
    off = -2 ** (bits - 1) if symmetric else 0
    out = {"packed": pack_rows((codes - off).astype(np.uint8))}
  else:
    off = 0 if symmetric else 2 ** (bits - 1)
    out = {"codes": (codes - off).astype(np.int8)}
  out["zero"] = zero - off
  out["scale"] = np.asarray(scale, np.float32)
  return out


def input_point(kernel_path: str) -> str:
  """The quant point that feeds the layer of a kernel ('blocks_0/mlp/fc1/kernel')."""
  layer = kernel_path[:-len("/kernel")]
  parts = layer.split("/")
  if parts[0] == "patch_embed":  # ViT `patch_embed`, Swin `patch_embed/proj`
    return "patch_in"
  if parts[-1] not in LAYER_INPUT:
    raise ValueError(f"no quant point known to feed {layer!r}")
  return "/".join(parts[:-1] + [LAYER_INPUT[parts[-1]]])


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
            "int_kernels": count(self.variables.get(INT_KERNELS, {})),
            "quant": count(self.variables["quant"])}


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
  return module.apply(variables, images)


def build(module: zoo.Model, params: dict, qstate: dict, kernels: dict,
          cfg: ml_collections.ConfigDict) -> IntegerModel:
  """An IntegerModel from flat float params (quantized kernels absent), the activation
  state and flat {kernel path: (codes, zero, scale)}."""
  reason = unsupported(cfg, qstate)
  if reason is not None:
    raise ValueError(f"no integer path for this quantized model: {reason}")
  quantized_points = {k[:-len("/scale")] for k in _flat(qstate) if k.endswith("/scale")}
  w = cfg.weights
  params, ints = dict(params), {}
  every = {**params, **{k: codes for k, (codes, _, _) in kernels.items()}}
  (patch,) = [v for k, v in every.items() if k.startswith("patch_embed/") and k.endswith("kernel")]
  for path, (codes, zero, scale) in kernels.items():
    layer = path[:-len("/kernel")]
    if input_point(path) in quantized_points:
      for k, v in kernel_state(codes, zero, scale, w.bits, w.symmetric).items():
        ints[f"{layer}/{k}"] = jnp.asarray(v)
    else:  # its input is kept in full precision: the layer runs in float, as fake-quant
      params[path] = jnp.asarray(
          (np.asarray(codes, np.float32) - np.asarray(zero)) * np.asarray(scale), jnp.float32)
  variables = {"params": _unflat({k: jnp.asarray(v) for k, v in params.items()}),
               "quant": jax.tree_util.tree_map(jnp.asarray, qstate),
               INT_KERNELS: _unflat(ints)}
  return IntegerModel(zoo.with_point(module, int_point_factory(cfg)), variables, cfg,
                      int(np.shape(patch)[2]))


def from_quantized(qm: Any) -> IntegerModel:
  """The integer model of a `QuantizedModel` (its kernels are already fake-quantized)."""
  w = qm.cfg.weights
  params, ws = _flat(qm.variables["params"]), _flat(qm.variables["wquant"])
  kernels, rest = {}, {}
  for path, value in params.items():
    if path + "/scale" in ws:
      s, z = np.asarray(ws[path + "/scale"]), np.asarray(ws[path + "/zero"])
      kernels[path] = (np.asarray(Q.to_int(value, s, z, w.bits, w.symmetric)), z, s)
    else:
      rest[path] = value
  return build(qm.module, rest, qm.variables["quant"], kernels, qm.cfg)


def load(path: str) -> IntegerModel:
  """The integer model of a file `export.save` wrote, without dequantizing its kernels."""
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
    kernels[key] = (codes, tensors[f"wquant/{key}/zero"].reshape(meta["scale_shapes"][key + "/zero"]),
                    tensors[f"wquant/{key}/scale"].reshape(meta["scale_shapes"][key + "/scale"]))
  quant = _unflat({k[len("quant/"):]: v for k, v in tensors.items() if k.startswith("quant/")})
  return build(native.rebuild(meta), params, quant, kernels, cfg)


def eval_logits(qm: Any, use_integer: bool) -> tuple[Callable[[jax.Array], jax.Array], str]:
  """What the evaluate stage runs on a quantized model, and which path that is: 'integer',
  or 'fake-quant' with the reason (eval.integer off, or no integer path)."""
  from spdfq_jax.quant import qmodel  # pylint: disable=g-import-not-at-top
  if not use_integer:
    return qm.logits, "fake-quant (eval.integer off)"
  if not isinstance(qm, qmodel.QuantizedModel):
    return qm.logits, f"fake-quant ({type(qm).__name__} has no integer path)"
  reason = unsupported(qm.cfg, qm.variables["quant"])
  if reason is not None:
    return qm.logits, f"fake-quant ({reason})"
  return from_quantized(qm).logits, "integer"
