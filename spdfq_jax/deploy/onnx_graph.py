"""The integer model as an ONNX graph that ONNX Runtime runs on its int8 kernels.

The graph is written node by node from the model's structure (ViT, DeiT, Swin) with the
`onnx` package, from the same parts as `quant.integer` (the export's weight codes, scales
and zero points, the calibrated activation state): nothing is re-calibrated. It is not
traced from JAX: jax2onnx lowers an int8 `dot_general` to a float MatMul, so no integer
kernel would run, and it brings a dozen more dependencies.

Every quantized linear layer is `MatMulInteger` (uint8 activations, int8 weights up to 7
bits, uint8 at 8 bits), then `Cast`, one `Mul` by the two scales and the bias, as the
integer model computes it (ONNX Runtime fuses them into `MatMulIntegerToFloat`). An
activation quantizer with an integer zero point is one `QuantizeLinear` (after a `Clip`
below 8 bits); the grid is shifted inside uint8 where the zero point is not. What stays
float (docs/deployment.md lists each with its cost):
- I&S-ViT's reparameterised zero point z + frac is not an integer: as in the integer model,
  the entries clipped to the grid's ends add one more `MatMulInteger` on their 0/1 mask
  (qkv and fc1 by default);
- post-softmax levels off a uniform grid (ias_log2, log2, log-sqrt2): the integer code is
  computed in float and its level looked up in a table, and `attn @ v` is a float MatMul
  on the dequantized v (the integer model splits it into int8 chunks; here it is about 2%
  of ViT-B's multiply-adds);
- a layer whose input is kept FP (the image, by default) runs in float on its dequantized
  kernel; LayerNorm, softmax, GELU and the residual adds are float, as everywhere.

8-bit weights are uint8 operands: on CPUs without VNNI, ONNX Runtime's uint8 x int8 kernel
sums pairs of products in int16 (vpmaddubsw), which saturates for 8-bit weights; up to 7
bits no pair can (2 * 255 * 64 < 2^15), so those run on the faster signed kernel.
`signed_8bit=True` (export_onnx --signed_8bit) takes the signed kernel at 8 bits too, for
CPUs with VNNI or AMX.

`build(parts)` gives the quantized graph; `build(parts, fp=True)` the FP32 graph of the
same (dequantized) weights, for comparison. The graph takes NHWC float images, as the JAX
model does, with a free batch dimension. The layers' writers are in `onnx_layers`.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper

from spdfq_jax.deploy import onnx_layers
from spdfq_jax.models import layers, native, swin, zoo
from spdfq_jax.quant import integer_model

META_KEY = native.META_KEY  # the architecture (`native.describe`), as the model's metadata


def write_vit(w: onnx_layers.Writer, m: zoo.VisionTransformer) -> str:
  """ViT / DeiT, as `vit.VisionTransformer`: the logits' tensor name."""
  g = w.g
  c = w.p.in_channels
  grid = m.img_size // m.patch_size
  x = w.patches(w.point(onnx_layers.INPUT, "patch_in", layers.ACT), "patch_embed",
                m.patch_size, (m.img_size, m.img_size), c)
  x = w.reshape(x, [-1, grid * grid, m.width], "patch_embed")
  prefix = ["cls_token"] + (["dist_token"] if m.distilled else [])
  # the prefix tokens broadcast to the batch: x[:, :1] * 0 + token
  first = g.op("Slice", [x, g.const(np.array([0], np.int64), "prefix/start", np.int64),
                         g.const(np.array([1], np.int64), "prefix/end", np.int64),
                         g.const(np.array([1], np.int64), "prefix/axis", np.int64)], "prefix")
  zero = g.op("Mul", [first, g.const(np.float32(0), "prefix/zero")], "prefix")
  tokens = [g.op("Add", [zero, g.const(w.p.params[t], t)], t) for t in prefix]
  x = g.op("Concat", tokens + [x], "embed", axis=1)
  x = g.op("Add", [x, g.const(w.p.params["pos_embed"], "pos_embed")], "embed")
  w.tokens, w.width = grid * grid + len(prefix), m.width
  for i in range(m.depth):
    b = f"blocks_{i}"
    x = g.op("Add", [x, w.attention(w.layer_norm(x, f"{b}/norm1", m.eps), f"{b}/attn",
                                       m.num_heads, None)], b)
    x = g.op("Add", [x, w.mlp(w.layer_norm(x, f"{b}/norm2", m.eps), f"{b}/mlp")], b)
  x = w.layer_norm(x, "norm", m.eps)
  def head(index: int, name: str) -> str:
    t = g.op("Gather", [x, g.const(np.int64(index), f"{name}/token", np.int64)], name, axis=1)
    return w.dense(w.point(t, f"{name}_in", layers.ACT), name)
  logits = head(0, "head")
  if m.distilled:
    logits = g.op("Div", [g.op("Add", [logits, head(1, "head_dist")], "heads"),
                          g.const(np.float32(2), "heads/two")], "heads")
  return logits


def write_swin(w: onnx_layers.Writer, m: zoo.SwinTransformer) -> str:
  """Swin, as `swin.SwinTransformer`: the logits' tensor name."""
  g = w.g
  c = w.p.in_channels
  x = w.patches(w.point(onnx_layers.INPUT, "patch_in", layers.ACT), "patch_embed/proj",
                   m.patch_size, (m.img_size, m.img_size), c)
  x = w.layer_norm(x, "patch_embed/norm", m.eps)
  res = m.img_size // m.patch_size
  for i, (depth, heads) in enumerate(zip(m.depths, m.num_heads)):
    dim, r = m.embed_dim * 2 ** i, res // 2 ** i
    if i > 0:
      p = f"layers_{i}/downsample"
      prev = dim // 2
      x = w.reshape(x, [-1, r, 2, r, 2, prev], p)
      x = w.reshape(g.op("Transpose", [x], p, perm=[0, 1, 3, 4, 2, 5]), [-1, r, r, 4 * prev], p)
      x = w.layer_norm(x, f"{p}/norm", m.eps)
      x = w.dense(w.point(x, f"{p}/reduction_in", layers.POST_LN), f"{p}/reduction")
    ws, shift = swin.window_and_shift(r, m.window_size, m.window_size // 2)
    for j in range(depth):
      x = write_swin_block(w, x, f"layers_{i}/blocks_{j}", heads, dim, r, ws,
                           shift if j % 2 else 0, m.eps)
  x = g.op("ReduceMean", [w.layer_norm(x, "norm", m.eps)], "pool", axes=[1, 2], keepdims=0)
  return w.dense(w.point(x, "head_in", layers.ACT), "head")


def write_swin_block(w: onnx_layers.Writer, x: str, path: str, heads: int, dim: int, r: int,
               ws: int, shift: int, eps: float) -> str:
  """One (shifted-)window block on a (B, r, r, dim) map, as `swin.SwinBlock`."""
  g = w.g
  y = w.layer_norm(x, f"{path}/norm1", eps)
  if shift:
    y = roll(w, y, -shift, r, path)
  y = w.reshape(y, [-1, r // ws, ws, r // ws, ws, dim], path)
  y = w.reshape(g.op("Transpose", [y], path, perm=[0, 1, 3, 2, 4, 5]), [-1, ws * ws, dim], path)
  table = np.asarray(w.p.params[f"{path}/attn/relative_position_bias_table"], np.float32)
  n = ws * ws
  bias = table[layers.relative_position_index(ws).reshape(-1)].reshape(n, n, heads)
  bias = bias.transpose(2, 0, 1)[None]  # (1, heads, N, N)
  if shift:
    bias = swin.shift_attention_mask(r, r, ws, shift)[:, None] + bias  # (nW, heads, N, N)
  w.tokens, w.width = n, dim
  y = w.attention(y, f"{path}/attn", heads, bias)
  y = w.reshape(y, [-1, r // ws, r // ws, ws, ws, dim], path)
  y = w.reshape(g.op("Transpose", [y], path, perm=[0, 1, 3, 2, 4, 5]), [-1, r, r, dim], path)
  if shift:
    y = roll(w, y, shift, r, path)
  x = g.op("Add", [x, y], path)
  return g.op("Add", [x, w.mlp(w.layer_norm(x, f"{path}/norm2", eps), f"{path}/mlp")], path)


def roll(w: onnx_layers.Writer, x: str, shift: int, size: int, path: str) -> str:
  """jnp.roll(x, (shift, shift), axis=(1, 2)) on a (B, size, size, C) map."""
  g = w.g
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


def build(parts: integer_model.Parts, fp: bool = False, signed_8bit: bool = False
          ) -> onnx.ModelProto:
  """The ONNX graph of the quantized model (fp: of its dequantized FP32 weights).
  `signed_8bit`: 8-bit weights as int8 operands too, faster, exact only where ONNX Runtime's
  kernel sums in int32 (CPUs with VNNI or AMX, ARM); off by default."""
  if not fp:
    reason = integer_model.unsupported(parts.cfg, parts.quant)
    if reason is not None:
      raise ValueError(f"no integer path for this quantized model: {reason}")
  w = onnx_layers.Writer(parts, fp, signed_8bit)
  m = parts.module
  logits = write_vit(w, m) if zoo.family(m) == "vit" else write_swin(w, m)
  w.g.nodes.append(helper.make_node("Identity", [logits], [onnx_layers.OUTPUT],
                                    name=onnx_layers.OUTPUT))
  model = w.g.model(["batch", m.img_size, m.img_size, parts.in_channels],
                    ["batch", m.num_classes])
  helper.set_model_props(model, {META_KEY: json.dumps(native.describe(m))})
  return model
