"""The integer model as an ONNX graph that ONNX Runtime runs on its int8 kernels.

The graph is written node by node from the model's structure (ViT, DeiT, Swin) with the
`onnx` package, from the same parts as `quant.integer` (the export's weight codes, scales
and zero points, the calibrated activation state): nothing is re-calibrated. It is not
traced from JAX: jax2onnx lowers an int8 `dot_general` to a float MatMul, so no integer
kernel would run, and it brings a dozen more dependencies.

Every quantized linear layer is `MatMulInteger` (uint8 activations, int8 weights up to 7
bits, uint8 at 8 bits), then `Cast`, one `Mul` by the two scales and the bias, as the
integer model computes it. An activation quantizer with an integer zero point is one
`QuantizeLinear` (after a `Clip` below 8 bits); the grid is shifted inside uint8 where the
zero point is not. What stays float (docs/deployment.md lists each with its cost):
- I&S-ViT's reparameterised zero point z + frac is not an integer: as in the integer model,
  the entries clipped to the grid's ends add one more `MatMulInteger` on their 0/1 mask
  (qkv and fc1 by default);
- post-softmax levels off a uniform grid (ias_log2, log2, log-sqrt2): the integer code is
  computed in float and its level looked up in a table, and `attn @ v` is a float MatMul
  on the dequantized v (the integer model splits it into
  int8 chunks; here it is about 2% of ViT-B's multiply-adds);
- a layer whose input is kept FP (the image, by default) runs in float on its dequantized
  kernel; LayerNorm, softmax, GELU and the residual adds are float, as everywhere.

8-bit weights are uint8 operands: on CPUs without VNNI, ONNX Runtime's uint8 x int8 kernel
sums pairs of products in int16 (vpmaddubsw), which saturates for 8-bit weights; up to 7
bits no pair can (2 * 255 * 64 < 2^15), so those run on the faster signed kernel.
`signed_8bit=True` (export_onnx --signed_8bit) takes the signed kernel at 8 bits too, for
CPUs with VNNI or AMX.

`build(parts)` gives the quantized graph; `build(parts, fp=True)` the FP32 graph of the
same (dequantized) weights, for comparison. The graph takes NHWC float images, as the JAX
model does, with a free batch dimension.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spdfq_jax.models import layers, native, swin, zoo
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import integer
from spdfq_jax.quant import quantizers as Q

OPSET = 17
INPUT, OUTPUT = "images", "logits"
META_KEY = native.META_KEY  # the architecture (`native.describe`), as the model's metadata


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
  """Writes one model's graph from its `integer.Parts` (fp: the FP32 graph instead)."""

  def __init__(self, parts: integer.Parts, fp: bool = False, signed_8bit: bool = False):
    self.p, self.fp, self.signed_8bit, self.g = parts, fp, signed_8bit, Graph()
    self.quant = integer._flat(parts.quant)  # pylint: disable=protected-access
    self.float_kernels = {}  # FP graph or FP-input layers: dequantized kernels
    for path, (codes, zero, scale) in parts.kernels.items():
      zero = np.rint(np.asarray(zero, np.float32))  # as the integer kernels hold it
      self.float_kernels[path] = ((np.asarray(codes, np.float32) - zero)
                                  * np.asarray(scale, np.float32)).astype(np.float32)

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
      code = g.op("Clip", [e, g.const(f32(0), f"{path}/emin"), g.const(f32(levels), f"{path}/emax")],
                  path)
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
      kernel = self.float_kernels.get(key, self.p.params.get(key))
      kernel = np.asarray(kernel, np.float32).reshape(-1, np.shape(kernel)[-1])
      y = g.op("MatMul", [self.dequantize(x, layer), g.const(kernel, key)], layer)
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

  def vit(self, m: zoo.VisionTransformer) -> str:
    g = self.g
    c = self.p.in_channels
    grid = m.img_size // m.patch_size
    x = self.patches(self.point(INPUT, "patch_in", layers.ACT), "patch_embed", m.patch_size,
                     (m.img_size, m.img_size), c)
    x = self.reshape(x, [-1, grid * grid, m.width], "patch_embed")
    prefix = ["cls_token"] + (["dist_token"] if m.distilled else [])
    # the prefix tokens broadcast to the batch: x[:, :1] * 0 + token
    first = g.op("Slice", [x, g.const(np.array([0], np.int64), "prefix/start", np.int64),
                           g.const(np.array([1], np.int64), "prefix/end", np.int64),
                           g.const(np.array([1], np.int64), "prefix/axis", np.int64)], "prefix")
    zero = g.op("Mul", [first, g.const(np.float32(0), "prefix/zero")], "prefix")
    tokens = [g.op("Add", [zero, g.const(self.p.params[t], t)], t) for t in prefix]
    x = g.op("Concat", tokens + [x], "embed", axis=1)
    x = g.op("Add", [x, g.const(self.p.params["pos_embed"], "pos_embed")], "embed")
    self.tokens, self.width = grid * grid + len(prefix), m.width
    for i in range(m.depth):
      b = f"blocks_{i}"
      x = g.op("Add", [x, self.attention(self.layer_norm(x, f"{b}/norm1", m.eps), f"{b}/attn",
                                         m.num_heads, None)], b)
      x = g.op("Add", [x, self.mlp(self.layer_norm(x, f"{b}/norm2", m.eps), f"{b}/mlp")], b)
    x = self.layer_norm(x, "norm", m.eps)
    def head(index: int, name: str) -> str:
      t = g.op("Gather", [x, g.const(np.int64(index), f"{name}/token", np.int64)], name, axis=1)
      return self.dense(self.point(t, f"{name}_in", layers.ACT), name)
    logits = head(0, "head")
    if m.distilled:
      logits = g.op("Div", [g.op("Add", [logits, head(1, "head_dist")], "heads"),
                            g.const(np.float32(2), "heads/two")], "heads")
    return logits

  def swin(self, m: zoo.SwinTransformer) -> str:
    g = self.g
    c = self.p.in_channels
    x = self.patches(self.point(INPUT, "patch_in", layers.ACT), "patch_embed/proj",
                     m.patch_size, (m.img_size, m.img_size), c)
    x = self.layer_norm(x, "patch_embed/norm", m.eps)
    res = m.img_size // m.patch_size
    for i, (depth, heads) in enumerate(zip(m.depths, m.num_heads)):
      dim, r = m.embed_dim * 2 ** i, res // 2 ** i
      if i > 0:
        p = f"layers_{i}/downsample"
        prev = dim // 2
        x = self.reshape(x, [-1, r, 2, r, 2, prev], p)
        x = self.reshape(g.op("Transpose", [x], p, perm=[0, 1, 3, 4, 2, 5]), [-1, r, r, 4 * prev], p)
        x = self.layer_norm(x, f"{p}/norm", m.eps)
        x = self.dense(self.point(x, f"{p}/reduction_in", layers.POST_LN), f"{p}/reduction")
      ws, shift = swin.window_and_shift(r, m.window_size, m.window_size // 2)
      for j in range(depth):
        x = self.swin_block(x, f"layers_{i}/blocks_{j}", heads, dim, r, ws,
                            shift if j % 2 else 0, m.eps)
    x = g.op("ReduceMean", [self.layer_norm(x, "norm", m.eps)], "pool", axes=[1, 2], keepdims=0)
    return self.dense(self.point(x, "head_in", layers.ACT), "head")

  def swin_block(self, x: str, path: str, heads: int, dim: int, r: int, ws: int, shift: int,
                 eps: float) -> str:
    g = self.g
    y = self.layer_norm(x, f"{path}/norm1", eps)
    if shift:
      y = self.roll(y, -shift, r, path)
    y = self.reshape(y, [-1, r // ws, ws, r // ws, ws, dim], path)
    y = self.reshape(g.op("Transpose", [y], path, perm=[0, 1, 3, 2, 4, 5]), [-1, ws * ws, dim], path)
    table = np.asarray(self.p.params[f"{path}/attn/relative_position_bias_table"], np.float32)
    n = ws * ws
    bias = table[layers.relative_position_index(ws).reshape(-1)].reshape(n, n, heads)
    bias = bias.transpose(2, 0, 1)[None]  # (1, heads, N, N)
    if shift:
      bias = swin.shift_attention_mask(r, r, ws, shift)[:, None] + bias  # (nW, heads, N, N)
    self.tokens, self.width = n, dim
    y = self.attention(y, f"{path}/attn", heads, bias)
    y = self.reshape(y, [-1, r // ws, r // ws, ws, ws, dim], path)
    y = self.reshape(g.op("Transpose", [y], path, perm=[0, 1, 3, 2, 4, 5]), [-1, r, r, dim], path)
    if shift:
      y = self.roll(y, shift, r, path)
    x = g.op("Add", [x, y], path)
    return g.op("Add", [x, self.mlp(self.layer_norm(x, f"{path}/norm2", eps), f"{path}/mlp")], path)

  def roll(self, x: str, shift: int, size: int, path: str) -> str:
    """jnp.roll(x, (shift, shift), axis=(1, 2)) on a (B, size, size, C) map."""
    g = self.g
    cut = (-shift) % size
    for axis in (1, 2):
      ax = g.const(np.array([axis], np.int64), f"{path}/roll_axis", np.int64)
      head = g.op("Slice", [x, g.const(np.array([cut], np.int64), f"{path}/roll_cut", np.int64),
                            g.const(np.array([size], np.int64), f"{path}/roll_end", np.int64), ax],
                  path)
      tail = g.op("Slice", [x, g.const(np.array([0], np.int64), f"{path}/roll_start", np.int64),
                            g.const(np.array([cut], np.int64), f"{path}/roll_cut", np.int64), ax],
                  path)
      x = g.op("Concat", [head, tail], path, axis=axis)
    return x


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


def build(parts: integer.Parts, fp: bool = False, signed_8bit: bool = False
          ) -> onnx.ModelProto:
  """The ONNX graph of the quantized model (fp: of its dequantized FP32 weights).
  `signed_8bit`: 8-bit weights as int8 operands too, faster, exact only where ONNX Runtime's
  kernel sums in int32 (CPUs with VNNI or AMX, ARM); off by default."""
  if not fp:
    reason = integer.unsupported(parts.cfg, parts.quant)
    if reason is not None:
      raise ValueError(f"no integer path for this quantized model: {reason}")
  w = Writer(parts, fp, signed_8bit)
  m = parts.module
  logits = w.vit(m) if zoo.family(m) == "vit" else w.swin(m)
  w.g.nodes.append(helper.make_node("Identity", [logits], [OUTPUT], name=OUTPUT))
  model = w.g.model(["batch", m.img_size, m.img_size, parts.in_channels],
                    ["batch", m.num_classes])
  helper.set_model_props(model, {META_KEY: json.dumps(native.describe(m))})
  return model
