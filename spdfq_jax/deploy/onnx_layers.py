"""The pieces of the ONNX graph: a node and initializer store, and the writer of each layer
(quant points, integer and float linear layers, attention, MLP) from `integer_model.Parts`.

docs/deployment.md lists which ONNX operators each piece becomes and why; `onnx_graph`
composes them into ViT, DeiT and Swin.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional, Union

import flax
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spdfq_jax.models import layers
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import integer, integer_model
from spdfq_jax.quant import quantizers as Q

OPSET = 17
INPUT, OUTPUT = "images", "logits"

class Graph:
  """Nodes and initializers, with unique names."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.inits: list[onnx.TensorProto] = []
    self._used = collections.Counter()

  def name(self, base: str) -> str:
    self._used[base] += 1
    return base if self._used[base] == 1 else f"{base}_{self._used[base] - 1}"

  def const(self, value, base: str, dtype=np.float32) -> str:
    name = self.name(base)
    self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name

  def op(self, op_type: str, inputs: list[str], base: str, outputs: int = 1, **attrs
         ) -> Union[str, list[str]]:
    outs = [self.name(f"{base}/{op_type}") for _ in range(outputs)]
    self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
    return outs[0] if outputs == 1 else outs

  def model(self, in_shape: list, out_shape: list) -> onnx.ModelProto:
    g = helper.make_graph(
        self.nodes, "spdfq_jax",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)], self.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="spdfq_jax")
    onnx.checker.check_model(m)
    return m


@dataclasses.dataclass(frozen=True)
class Codes:
  """A quantized activation in the graph: x ~ (codes - zero) * scale (- frac * scale * mask).

  codes: uint8 tensor; zero: uint8 scalar initializer (None: the codes' zero point is
  `zero_vec`, per channel or off uint8, folded into the next layer's bias)."""
  codes: str
  scale: np.float32
  zero: Optional[str]
  zero_vec: Optional[np.ndarray] = None
  mask: Optional[str] = None
  frac: np.float32 = np.float32(0)


Value = Union[str, Codes]


class Writer:
  """Writes one model's graph from its `integer_model.Parts` (fp: the FP32 graph instead)."""

  def __init__(self, parts: integer_model.Parts, fp: bool = False, signed_8bit: bool = False):
    self.p, self.fp, self.signed_8bit, self.g = parts, fp, signed_8bit, Graph()
    self.quant = flax.traverse_util.flatten_dict(flax.core.unfreeze(parts.quant), sep="/")

  def float_kernel(self, key: str) -> np.ndarray:
    """The kernel at `key` in float: dequantized where it is quantized (only the FP graph
    and layers whose input stays FP need it), as (rows, features)."""
    if key in self.p.kernels:
      codes, zero, scale = self.p.kernels[key]
      zero = np.rint(np.asarray(zero, np.float32))  # as the integer kernels hold it
      kernel = (np.asarray(codes, np.float32) - zero) * np.asarray(scale, np.float32)
    else:
      kernel = np.asarray(self.p.params[key], np.float32)
    return kernel.reshape(-1, kernel.shape[-1]).astype(np.float32)

  # --- activations -----------------------------------------------------------------------

  def point(self, x: str, path: str, kind: str) -> Value:
    """The quant point at `path` applied to x: Codes, or a float tensor (kept FP, or a
    post-softmax quantizer without an integer grid: its dequantized levels)."""
    if self.fp:
      return x
    spec = qconfig.point_spec(self.p.cfg, kind, path)
    if spec.quantizer == "none":
      return x
    state = {k[len(path) + 1:]: np.asarray(v) for k, v in self.quant.items()
             if k.startswith(path + "/")}
    if spec.quantizer in ("ias_log2", "log2", "log_sqrt2"):
      return self._log_levels(x, spec, state, path)
    if spec.quantizer != "uniform" or spec.dynamic:
      raise ValueError(f"{path}: the {spec.quantizer!r} quantizer has no ONNX form")
    fractional = (spec.granularity == "channel" and not self.p.cfg.reparam_round_zero
                  and np.ndim(state["zero"]) == 0)
    return self._uniform(x, spec, np.float32(state["scale"]), state["zero"], fractional, path)

  def _uniform(self, x: str, spec: qconfig.PointSpec, s: np.float32, zero: np.ndarray,
               fractional: bool, path: str) -> Codes:
    g = self.g
    qmin, qmax = Q.qrange(spec.bits, spec.symmetric)
    zero = np.asarray(zero, np.float32)
    whole = np.floor(zero) if fractional else np.round(zero)
    frac = np.float32(zero - whole) if fractional else np.float32(0)
    mask = None
    if frac:  # clipped entries sit frac off the grid: their 0/1 mask (integer.encode)
      low = g.op("Less", [x, g.const(np.float32(qmin - whole - 0.5) * s, f"{path}/low")], path)
      high = g.op("GreaterOrEqual",
                  [x, g.const(np.float32(qmax - whole - 0.5) * s, f"{path}/high")], path)
      mask = g.op("Cast", [g.op("Or", [low, high], path)], path, to=TensorProto.UINT8)
    if np.ndim(whole) == 0:
      # uint8 codes u = round(x / s) + zq: any zq keeping [qmin - whole, qmax - whole] + zq
      # inside 0..255 gives the same products.
      lo, hi = max(whole - qmin, 0), min(255 - qmax + whole, 255)
      if lo <= hi:
        zq = int(np.clip(whole, lo, hi))
        if not (zq + qmin - whole == 0 and zq + qmax - whole == 255):  # uint8 does not clip it
          x = g.op("Clip", [x, g.const(np.float32(qmin - whole) * s, f"{path}/min"),
                            g.const(np.float32(qmax - whole) * s, f"{path}/max")], path)
        zq_name = g.const(np.uint8(zq), f"{path}/zero", np.uint8)
        u = g.op("QuantizeLinear", [x, g.const(s, f"{path}/scale"), zq_name], path)
        return Codes(u, s, zq_name, mask=mask, frac=frac)
    # A zero point per channel, or off uint8: round, shift, clip and cast in float.
    off = -qmin
    t = g.op("Round", [g.op("Div", [x, g.const(s, f"{path}/scale")], path)], path)
    t = g.op("Add", [t, g.const(whole + off, f"{path}/zero")], path)
    t = g.op("Clip", [t, g.const(np.float32(qmin + off), f"{path}/min"),
                      g.const(np.float32(qmax + off), f"{path}/max")], path)
    u = g.op("Cast", [t], path, to=TensorProto.UINT8)
    return Codes(u, s, None, (whole + off).astype(np.float64), mask, frac)

  def _log_levels(self, x: str, spec: qconfig.PointSpec, state: dict, path: str) -> str:
    """The dequantized post-softmax levels, as `integer.encode` + `LogCodes.dequantize`: the
    integer code computed in float as there, then its level looked up in a table (one
    `Gather` instead of a power and a select per element)."""
    g = self.g
    f32 = np.float32
    if spec.quantizer == "ias_log2":
      n = 2 ** spec.bits
      shift, lo, hi = (f32(state[k]) for k in ("shift", "lo", "hi"))
      step = max(f32((hi - lo) / f32(n)), f32(Q.EPS))
      t = g.op("Div", [g.op("Log", [g.op("Add", [x, g.const(shift, f"{path}/shift")], path)],
                             path), g.const(np.log(f32(2.0)), f"{path}/ln2")], path)
      code = g.op("Round", [g.op("Div", [g.op("Sub", [t, g.const(lo, f"{path}/lo")], path),
                                         g.const(step, f"{path}/step")], path)], path)
      code = g.op("Clip", [code, g.const(f32(0), f"{path}/cmin"), g.const(f32(n), f"{path}/cmax")],
                  path)
      # level of code c: 2^e - shift, e = round(c * step + lo); levels more than
      # MAX_EXPONENT below the top one dropped (0 - shift), as the integer model
      e = np.round(np.arange(n + 1, dtype=f32) * step + lo).astype(f32)
      top = np.round(f32(n) * step + lo)
      table = np.where(top - e <= integer.MAX_EXPONENT, f32(2.0) ** e, f32(0)).astype(f32) - shift
    else:
      step = 1.0 if spec.quantizer == "log2" else 0.5
      levels = 2 ** spec.bits
      scale = f32(state["scale"])
      ratio = g.op("Max", [g.op("Div", [x, g.const(scale, f"{path}/scale")], path),
                           g.const(f32(2.0 ** -(step * levels + 2)), f"{path}/floor")], path)
      e = g.op("Round", [g.op("Div", [g.op("Neg", [g.op("Log", [ratio], path)], path),
                                      g.const(f32(np.log(2.0) * step), f"{path}/ln2step")],
                              path)], path)
      # e clipped at 0 (x above the scale) and at `levels` (below the last level: 0)
      code = g.op("Clip", [e, g.const(f32(0), f"{path}/emin"),
                           g.const(f32(levels), f"{path}/emax")], path)
      k = np.arange(levels + 1, dtype=f32)
      table = np.where(k < levels, scale * f32(2.0) ** (f32(-step) * k), f32(0)).astype(f32)
    index = g.op("Cast", [code], path, to=TensorProto.INT32)  # half int64's memory traffic
    return g.op("Gather", [g.const(table, f"{path}/levels"), index], path, axis=0)

  def dequantize(self, x: Value, path: str) -> str:
    if isinstance(x, str):
      return x
    g = self.g
    if x.zero is not None:
      y = g.op("DequantizeLinear", [x.codes, g.const(x.scale, f"{path}/dq_scale"), x.zero], path)
    else:
      y = g.op("Mul", [g.op("Sub", [g.op("Cast", [x.codes], path, to=TensorProto.FLOAT),
                                    g.const(x.zero_vec, f"{path}/dq_zero")], path),
                       g.const(x.scale, f"{path}/dq_scale")], path)
    if x.mask is not None:
      y = g.op("Sub", [y, g.op("Mul", [g.op("Cast", [x.mask], path, to=TensorProto.FLOAT),
                                       g.const(x.frac * x.scale, f"{path}/dq_frac")], path)], path)
    return y

  # --- layers ----------------------------------------------------------------------------

  def dense(self, x: Value, layer: str) -> str:
    """x @ kernel + bias of the linear layer at `layer`, on integers where x is Codes."""
    g = self.g
    key = f"{layer}/kernel"
    bias = self.p.params.get(f"{layer}/bias")
    if isinstance(x, str) or key not in self.p.kernels:
      y = g.op("MatMul", [self.dequantize(x, layer), g.const(self.float_kernel(key), key)],
               layer)
      return y if bias is None else g.op("Add", [y, g.const(bias, f"{layer}/bias")], layer)
    codes, w_zero, w_scale = self.p.kernels[key]
    w, wz = weight_operand(codes, w_zero, self.p.cfg.weights.bits, key, self.signed_8bit)
    w_name, wz_name = g.const(w, key, w.dtype), g.const(wz, f"{layer}/kernel_zero", wz.dtype)
    w_scale = np.asarray(w_scale, np.float32).reshape(-1)
    y = self.int_matmul(x.codes, w_name, x.zero, wz_name, x.scale, w_scale, layer)
    total = np.zeros(w.shape[-1], np.float64) if bias is None else np.asarray(bias, np.float64)
    if x.zero is None:  # sum_k zero_k (w_kn - zw_n), taken off in float with the bias
      centred = w.astype(np.float64) - wz.astype(np.float64)
      total = total - (np.broadcast_to(x.zero_vec, (w.shape[0],)) @ centred) * (
          np.float64(x.scale) * w_scale)
    if bias is not None or x.zero is None:
      y = g.op("Add", [y, g.const(total.astype(np.float32), f"{layer}/bias")], layer)
    if x.mask is not None:
      y = g.op("Add", [y, self.int_matmul(x.mask, w_name, None, wz_name, -x.frac * x.scale,
                                          w_scale, f"{layer}/mask")], layer)
    return y

  def int_matmul(self, a: str, b: str, a_zero: Optional[str], b_zero: Optional[str],
                 a_scale, b_scale, path: str) -> str:
    """(a - a_zero) @ (b - b_zero) * a_scale * b_scale: MatMulInteger, Cast and a Mul by the
    product of the two scales, written as a Mul node (ONNX Runtime fuses the four into one
    MatMulIntegerToFloat kernel, with the bias Add that follows, unless its ConstantFolding
    pass has folded the scale product first: `onnx_runtime.session` turns that pass off)."""
    g = self.g
    y = g.op("MatMulInteger", [a, b, a_zero or "", b_zero or ""], path)
    scale = g.op("Mul", [g.const(np.float32(a_scale), f"{path}/a_scale"),
                         g.const(np.asarray(b_scale, np.float32), f"{path}/b_scale")], path)
    return g.op("Mul", [g.op("Cast", [y], path, to=TensorProto.FLOAT), scale], path)

  def matmul(self, a: Value, b: Value, path: str) -> str:
    """a @ b over the last two axes (attention), on integers where both are Codes with
    uint8 zero points and no mask."""
    g = self.g
    if all(isinstance(v, Codes) and v.zero is not None and v.mask is None for v in (a, b)):
      return self.int_matmul(a.codes, b.codes, a.zero, b.zero, a.scale, b.scale, path)
    return g.op("MatMul", [self.dequantize(a, path + "/a"), self.dequantize(b, path + "/b")], path)

  def layer_norm(self, x: str, path: str, eps: float) -> str:
    g = self.g
    return g.op("LayerNormalization", [x, g.const(self.p.params[f"{path}/scale"], f"{path}/scale"),
                                       g.const(self.p.params[f"{path}/bias"], f"{path}/bias")],
                path, axis=-1, epsilon=float(eps))

  def gelu(self, x: str, path: str) -> str:
    """Exact GELU, x * (1 + erf(x / sqrt 2)) / 2 (ONNX Runtime fuses it into one kernel)."""
    g = self.g
    e = g.op("Erf", [g.op("Div", [x, g.const(np.sqrt(2.0), f"{path}/sqrt2")], path)], path)
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [e, g.const(1.0, f"{path}/one")], path)], path),
                        g.const(0.5, f"{path}/half")], path)

  def reshape(self, x: str, shape: list[int], path: str) -> str:
    return self.g.op("Reshape", [x, self.g.const(np.asarray(shape, np.int64), f"{path}/shape",
                                                 np.int64)], path)

  def patches(self, x: Value, layer: str, patch: int, hw: tuple[int, int], channels: int
              ) -> str:
    """The patch projection (stride = kernel size) as a matmul over patches: (B, h, w, D)."""
    h, w = hw[0] // patch, hw[1] // patch
    def to_patches(t: str) -> str:
      t = self.reshape(t, [-1, h, patch, w, patch, channels], layer)
      t = self.g.op("Transpose", [t], layer, perm=[0, 1, 3, 2, 4, 5])
      return self.reshape(t, [-1, h, w, patch * patch * channels], layer)
    if isinstance(x, Codes):
      if x.zero_vec is not None and np.ndim(x.zero_vec):
        raise ValueError(f"{layer}: a per-channel zero point at the patch input has no ONNX form")
      x = dataclasses.replace(x, codes=to_patches(x.codes),
                              mask=None if x.mask is None else to_patches(x.mask))
    else:
      x = to_patches(x)
    return self.dense(x, layer)

  def attention(self, x: str, path: str, heads: int, bias: Optional[np.ndarray]) -> str:
    """Multi-head self-attention on (B', N, D) tokens; `bias` (.., heads, N, N) is added
    to the logits of (B' / len(bias)) groups of windows (Swin), broadcast over them."""
    g = self.g
    n, d = self.tokens, self.width
    hd = d // heads
    qkv = self.dense(self.point(x, f"{path}/qkv_in", layers.POST_LN), f"{path}/qkv")
    qkv = g.op("Transpose", [self.reshape(qkv, [-1, n, 3, heads, hd], path)], path,
               perm=[2, 0, 3, 1, 4])
    q, k, v = g.op("Split", [qkv], path, outputs=3, axis=0)
    q, k, v = (self.reshape(t, [-1, heads, n, hd], path) for t in (q, k, v))
    q = g.op("Mul", [q, g.const(np.float32(hd ** -0.5), f"{path}/qscale")], path)
    qc = self.point(q, f"{path}/q", layers.ACT)
    kc = self.point(k, f"{path}/k", layers.ACT)
    if isinstance(kc, Codes):
      kc = dataclasses.replace(kc, codes=g.op("Transpose", [kc.codes], path, perm=[0, 1, 3, 2]))
    else:
      kc = g.op("Transpose", [kc], path, perm=[0, 1, 3, 2])
    logits = self.matmul(qc, kc, f"{path}/scores")
    if bias is not None:
      groups = bias.shape[0]
      logits = self.reshape(logits, [-1, groups, heads, n, n], path)
      logits = g.op("Add", [logits, g.const(bias, f"{path}/bias")], path)
      logits = self.reshape(logits, [-1, heads, n, n], path)
    attn = self.point(g.op("Softmax", [logits], path, axis=-1), f"{path}/softmax", layers.SOFTMAX)
    out = self.matmul(attn, self.point(v, f"{path}/v", layers.ACT), f"{path}/attn_v")
    out = self.reshape(g.op("Transpose", [out], path, perm=[0, 2, 1, 3]), [-1, n, d], path)
    return self.dense(self.point(out, f"{path}/proj_in", layers.ACT), f"{path}/proj")

  def mlp(self, x: str, path: str) -> str:
    h = self.dense(self.point(x, f"{path}/fc1_in", layers.POST_LN), f"{path}/fc1")
    h = self.gelu(h, path)
    return self.dense(self.point(h, f"{path}/fc2_in", layers.ACT), f"{path}/fc2")

  # --- families --------------------------------------------------------------------------


def weight_operand(codes: np.ndarray, zero: np.ndarray, bits: int, path: str,
                   signed_8bit: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(codes, per-column zero point) of a kernel as MatMulInteger's B operand: int8 centred
  on the grid up to 7 bits, uint8 at 8 bits unless `signed_8bit` (the module docstring
  says why)."""
  codes = np.asarray(codes, np.int64)
  codes = codes.reshape(-1, codes.shape[-1])  # a conv kernel (HWIO) as (H*W*I, O)
  zero = np.rint(np.asarray(zero, np.float64)).astype(np.int64).reshape(-1)
  zero = np.broadcast_to(zero, (codes.shape[1],))
  if bits <= 7 or signed_8bit:
    shift, dtype, lo, hi = (int(codes.min()) + int(codes.max()) + 1) // 2, np.int8, -128, 127
  else:
    shift, dtype, lo, hi = int(codes.min()), np.uint8, 0, 255
  w, wz = codes - shift, zero - shift
  if w.min() < lo or w.max() > hi or wz.min() < lo or wz.max() > hi:
    raise ValueError(f"{path}: weight codes {codes.min()}..{codes.max()} with zero points "
                     f"{zero.min()}..{zero.max()} do not fit one {np.dtype(dtype).name} operand")
  return w.astype(dtype), wz.astype(dtype)
