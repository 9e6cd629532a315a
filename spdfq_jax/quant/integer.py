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

Post-softmax attention (I&S-ViT's 2^e - shift, log2, or log-sqrt2: 2^(-e/2)) feeds
`attn @ v` as int8 codes: a level 2^-f is 2^(8c+7-f) / 2^(8c+7) for the chunk c = f // 8 of
eight exponents, and 2^(8c+7-f) - 1 is in 0..127, an int8 code with zero point -1; one
int8 matmul per chunk (and, for log-sqrt2, per parity of e: odd levels carry a float factor
2^-1/2) sums to the exact result, and the shift is one correction term (shift times the
contracted sums of v's codes). Exponents f above `MAX_EXPONENT` (levels below 2^-32 of the
top one, far under float32 resolution of the sum) are dropped, so at most four chunks run.

I&S-ViT's reparameterised zero point z + frac is not an integer: inside the grid the codes
are those of the integer zero point z, and only the entries clipped to the grid's ends sit
frac off it, which one more int8 matmul on their 0/1 mask adds (`IntCodes.parts`). A
layer whose input stays FP (the image, by default) dequantizes its integer kernel when it
runs (`FloatInput`).

Kernels live in the `int_kernels` collection as int8 codes (5-8 bits) or packed two per
byte (2-4 bits, unpacked inside the compiled function) with an int32 zero point and a
float32 scale per output channel; no float copy of a quantized kernel is kept.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spdfq_jax.models import layers
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import qmodel
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
LINEAR_INPUTS = frozenset(LAYER_INPUT.values()) | {"patch_in"}


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


def _letters(spec: str) -> tuple[str, str, str, list[str]]:
  """(lhs letters, rhs letters, output letters, contracted letters) of an einsum spec."""
  ins, out = spec.split("->")
  la, lb = ins.split(",")
  return la, lb, out, [c for c in la if c in lb and c not in out]


def _summed(x: jax.Array, letters: str, contracted: list[str], out: str) -> jax.Array:
  """x summed in int32 over the contracted axes, laid out to broadcast against `out`."""
  axes = tuple(letters.index(c) for c in contracted)
  rest = "".join(c for c in letters if c not in contracted)
  return _axes_to(jnp.sum(x, axis=axes, dtype=jnp.int32), rest, out)


def _size(x: jax.Array, letters: str, contracted: list[str]) -> int:
  """How many terms each output element of the einsum sums."""
  return int(np.prod([x.shape[letters.index(c)] for c in contracted]))


def int_einsum(spec: str, a: "IntCodes", b: "IntCodes") -> jax.Array:
  """einsum of two dequantized operands, on their int8 codes (scalar zero points)."""
  la, lb, out, contracted = _letters(spec)
  size = _size(a.codes, la, contracted)
  if EXACT_FLOAT32_ATTENTION and size * 128 * 128 < 2 ** 24:
    acc = jnp.einsum(spec, a.codes.astype(jnp.float32), b.codes.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)
  else:
    acc = jnp.einsum(spec, a.codes, b.codes, preferred_element_type=jnp.int32)
  acc = (acc - b.zero * _summed(a.codes, la, contracted, out)
         - a.zero * _summed(b.codes, lb, contracted, out) + size * a.zero * b.zero)
  return acc.astype(jnp.float32) * (a.scale * b.scale)


def encoded_einsum(spec: str, a: "IntCodes", b: "IntCodes") -> jax.Array:
  """einsum of two encoded operands: the sum over their integer parts (`IntCodes.parts`)."""
  return functools.reduce(jnp.add, [int_einsum(spec, pa, pb)
                                    for pa in a.parts() for pb in b.parts()])


# --- what the points return --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IntCodes(layers.Encoded):
  """A uniformly quantized activation: x ~ (codes - zero) * scale, codes int8.

  A zero point z + frac that is not an integer (I&S-ViT's reparameterised one) shifts the
  grid's clipped ends off the integer grid: there x ~ (codes - zero - frac) * scale, with
  `clipped` (int8 0/1) marking them; `parts` splits that into two integer operands."""
  codes: jax.Array  # int8
  zero: jax.Array   # int32, () or (channels,)
  scale: jax.Array  # float32 ()
  clipped: Optional[jax.Array] = None  # int8 0/1, only with a non-integer zero point
  frac: Optional[jax.Array] = None     # float32 (): the zero point's fractional part

  def parts(self) -> list["IntCodes"]:
    """Integer operands (no fractional part) whose dequantized sum is this activation."""
    plain = IntCodes(self.codes, self.zero, self.scale)
    if self.clipped is None:
      return [plain]
    return [plain, IntCodes(self.clipped, jnp.int32(0), -self.frac * self.scale)]

  def dequantize(self) -> jax.Array:
    return functools.reduce(jnp.add, [
        (p.codes.astype(jnp.int32) - p.zero).astype(jnp.float32) * p.scale
        for p in self.parts()])

  def dense(self, layer: nn.Module) -> jax.Array:
    rows = self.codes.shape[-1]
    kernel = _int_kernel(layer, rows)
    if kernel is None:  # the layer is kept in full precision: its input is dequantized
      w = layer.param("kernel", layer.kernel_init, (rows, layer.features), layer.param_dtype)
      y = jnp.dot(self.dequantize(), w)
    else:
      w, w_zero, w_scale = kernel
      y = functools.reduce(jnp.add, [
          int_matmul(p.codes, p.zero, w, w_zero).astype(jnp.float32) * (p.scale * w_scale)
          for p in self.parts()])
    if layer.use_bias:
      y = y + layer.param("bias", layer.bias_init, (layer.features,), layer.param_dtype)
    return y

  def conv(self, layer: nn.Module) -> jax.Array:
    """A patch projection (stride = kernel size, no padding) as a matmul over patches."""
    ph, pw = layer.kernel_size
    if tuple(np.broadcast_to(layer.strides, 2)) != (ph, pw) or layer.padding != "VALID":
      raise ValueError(f"{'/'.join(layer.path)}: integer convolution needs stride = kernel "
                       "size and VALID padding (a patch projection)")
    def patches(x):
      b, h, w, c = x.shape
      x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
      return x.reshape(b, h // ph, w // pw, ph * pw * c)
    zero = self.zero if jnp.ndim(self.zero) == 0 else jnp.tile(self.zero, ph * pw)
    clipped = None if self.clipped is None else patches(self.clipped)
    return IntCodes(patches(self.codes), zero, self.scale, clipped, self.frac).dense(layer)

  def einsum(self, spec: str, other: Any, lhs: bool) -> jax.Array:
    if not isinstance(other, layers.Encoded):  # the other operand is kept in full precision
      x = self.dequantize()
      return jnp.einsum(spec, x, other) if lhs else jnp.einsum(spec, other, x)
    if isinstance(other, LogCodes):
      return other.einsum(spec, self, not lhs)
    return encoded_einsum(spec, self, other) if lhs else encoded_einsum(spec, other, self)


@dataclasses.dataclass(frozen=True)
class FloatInput(layers.Encoded):
  """A layer input kept in full precision (keep_fp, e.g. the image): the layer's kernel may
  still be quantized, and then lives only as integer codes, dequantized when used."""
  x: jax.Array

  def _kernel(self, layer: nn.Module, rows: int) -> Optional[jax.Array]:
    kernel = _int_kernel(layer, rows)
    if kernel is None:
      return None
    codes, zero, scale = kernel
    return (codes.astype(jnp.int32) - zero).astype(jnp.float32) * scale

  def dense(self, layer: nn.Module) -> jax.Array:
    w = self._kernel(layer, self.x.shape[-1])
    if w is None:
      return nn.Dense.__call__(layer, self.x)
    y = jnp.dot(self.x, w)
    return y + layer.param("bias", layer.bias_init, (layer.features,)) if layer.use_bias else y

  def conv(self, layer: nn.Module) -> jax.Array:
    ph, pw = layer.kernel_size
    w = self._kernel(layer, ph * pw * self.x.shape[-1])
    if w is None:
      return nn.Conv.__call__(layer, self.x)
    w = w.reshape(ph, pw, self.x.shape[-1], layer.features)  # HWIO, as the export wrote it
    strides = tuple(int(s) for s in np.broadcast_to(layer.strides, 2))
    y = jax.lax.conv_general_dilated(self.x, w, strides, layer.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer.param("bias", layer.bias_init, (layer.features,)) if layer.use_bias else y


@dataclasses.dataclass(frozen=True)
class LogCodes(layers.Encoded):
  """Log-domain attention probabilities: x ~ scale * 2^(-step * e) where `inside`, else 0,
  less `offset` everywhere (I&S-ViT's quantizer: 2^e - shift)."""
  e: jax.Array       # int32 exponents in 0..levels-1
  inside: jax.Array  # bool
  scale: jax.Array   # float32 ()
  step: float        # 1 (log2) or 0.5 (log-sqrt2)
  levels: int
  offset: Optional[jax.Array] = None  # float32 ()

  def dequantize(self) -> jax.Array:
    x = jnp.where(self.inside, self.scale * 2.0 ** (-self.step * self.e), 0.0)
    return x if self.offset is None else x - self.offset

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
    parts = [encoded_einsum(spec, c, other) if lhs else encoded_einsum(spec, other, c)
             for c in self.chunks()]
    if self.offset is not None:  # - offset * (the other operand summed over the contraction)
      la, lb, out, contracted = _letters(spec)
      letters = lb if lhs else la
      parts += [-self.offset * p.scale * (_summed(p.codes, letters, contracted, out)
                                          - _size(p.codes, letters, contracted) * p.zero
                                          ).astype(jnp.float32)
                for p in other.parts()]
    return functools.reduce(jnp.add, parts)


def encode(spec: qconfig.PointSpec, x: jax.Array, state: dict, fractional_zero: bool = False
           ) -> layers.Encoded:
  """The codes of x under one point's quantizer (the same rounding as fake quantization).
  `fractional_zero`: the zero point need not be an integer (a reparameterised one)."""
  if spec.quantizer == "ias_log2":
    # 2^e - shift, e = round(code * step + lo) an integer: levels 2^top * 2^-f, f = top - e,
    # top the exponent of the last code. Levels more than MAX_EXPONENT below it are dropped.
    n = 2 ** spec.bits
    shift, lo, hi = (jnp.asarray(state[k], jnp.float32) for k in ("shift", "lo", "hi"))
    step = jnp.maximum((hi - lo) / n, Q.EPS)
    code = jnp.clip(jnp.round((Q.log2_torch(x + shift) - lo) / step), 0, n)
    top = jnp.round(n * step + lo)
    f = (top - jnp.round(code * step + lo)).astype(jnp.int32)
    levels = MAX_EXPONENT + 1
    return LogCodes(jnp.minimum(f, levels - 1), f < levels, 2.0 ** top, 1.0, levels, shift)
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
  off = 0 if spec.symmetric else 2 ** (spec.bits - 1)
  scale = jnp.asarray(scale, jnp.float32)
  if fractional_zero:
    # round(x / s) + z clipped to [qmin, qmax], less z: inside the grid round(x / s) on the
    # integer grid; at a clipped end qmin - z or qmax - z, off it by frac(z).
    whole = jnp.floor(zero)
    t = jnp.round(x / scale)
    low, high = t + zero < qmin, t + zero > qmax
    q = jnp.where(low, qmin, jnp.where(high, qmax, t + whole)).astype(jnp.int32)
    return IntCodes((q - off).astype(jnp.int8), whole.astype(jnp.int32) - off, scale,
                    (low | high).astype(jnp.int8), jnp.asarray(zero - whole, jnp.float32))
  q = jnp.clip(jnp.round(x / scale + zero), qmin, qmax).astype(jnp.int32)
  return IntCodes((q - off).astype(jnp.int8), jnp.round(zero).astype(jnp.int32) - off, scale)


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
    if spec.quantizer == "none":  # a linear layer's input kept FP: its kernel may be integer
      return FloatInput(x) if path.split("/")[-1] in LINEAR_INPUTS else x
    if spec.dynamic:
      raise ValueError(f"quant point {path!r}: per-token ranges have no integer path")
    state = {k: self.get_variable("quant", k) for k in qmodel.STATE_KEYS
             if self.has_variable("quant", k)}
    if not state:
      raise ValueError(f"quant point {path!r} has no calibrated state")
    # I&S-ViT's reparameterised zero point is the mean of per-channel ones (not rounded).
    fractional = (spec.granularity == "channel" and not self.cfg.reparam_round_zero
                  and "zero" in state and jnp.ndim(state["zero"]) == 0)
    return encode(spec, x, state, fractional)


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
