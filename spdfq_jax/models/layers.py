"""Building blocks shared by ViT/DeiT and Swin.

Every place where quantization may act is a named *point*: a module built from the
model's `point` factory and called on the tensor that flows through it. The default
factory is `Point`, the identity, so the FP model carries no extra variables and no
extra cost. The quantization package passes its own factory (same call signature)
to turn the same module into a fake-quantized one without renaming any parameter.

A point may also return an `Encoded` activation instead of an array (integer inference,
`spdfq_jax.quant.integer`): the layers a point feeds (`Dense`, `Conv`, `einsum`) hand such
an input to it, so the same modules run on integer codes; array inputs take the float path.
"""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Kinds of quant points; a quantizer factory may treat them differently.
ACT = "act"          # input of a linear layer or an attention-matmul operand
POST_LN = "post_ln"  # input of a linear layer that directly follows a LayerNorm
SOFTMAX = "softmax"  # post-softmax attention probabilities

PointFactory = Callable[..., nn.Module]


class Encoded:
  """A quantized activation that computes the layer it feeds (see the module docstring).

  `dense(layer)` / `conv(layer)` are called inside the layer's own method (so they may
  read its variables); `einsum(spec, other, lhs)` is `einsum(spec, self, other)` when
  lhs, else `einsum(spec, other, self)`.
  """

  def dense(self, layer: nn.Module) -> jax.Array:
    raise NotImplementedError

  def conv(self, layer: nn.Module) -> jax.Array:
    raise NotImplementedError

  def einsum(self, spec: str, other: "Encoded", lhs: bool) -> jax.Array:
    raise NotImplementedError


class Dense(nn.Dense):
  """nn.Dense (same parameters and function); an `Encoded` input computes it."""

  @nn.compact
  def __call__(self, inputs):
    if isinstance(inputs, Encoded):
      return inputs.dense(self)
    return super().__call__(inputs)


class Conv(nn.Conv):
  """nn.Conv (same parameters and function); an `Encoded` input computes it."""

  @nn.compact
  def __call__(self, inputs):
    if isinstance(inputs, Encoded):
      return inputs.conv(self)
    return super().__call__(inputs)


class Point(nn.Module):
  """Identity quant point: marks a tensor that quantization may wrap."""
  kind: str = ACT

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def _cast(dtype: Optional[str], *xs: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(x.astype(dtype) for x in xs) if dtype else xs


def _float32_out(dtype: Optional[str]) -> dict:
  return {"preferred_element_type": jnp.float32} if dtype else {}


def cast_dot_general(dtype: Optional[str]) -> Optional[Callable]:
  """Dense matmul on `dtype` operands with a float32 result (None: the plain one)."""
  if not dtype:
    return None

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    return jax.lax.dot_general(*_cast(dtype, lhs, rhs), dimension_numbers, precision,
                               preferred_element_type=jnp.float32)
  return dot_general


def cast_conv(dtype: Optional[str]) -> Optional[Callable]:
  """Convolution on `dtype` operands with a float32 result (None: the plain one)."""
  if not dtype:
    return None

  def conv(lhs, rhs, *args, **kwargs):
    kwargs.pop("preferred_element_type", None)
    return jax.lax.conv_general_dilated(*_cast(dtype, lhs, rhs), *args,
                                        preferred_element_type=jnp.float32, **kwargs)
  return conv


def dense(features: int, matmul_dtype: Optional[str], name: str, use_bias: bool = True
          ) -> nn.Dense:
  """nn.Dense whose matmul runs on `matmul_dtype` operands (None: float32 throughout)."""
  return Dense(features, use_bias=use_bias, dot_general=cast_dot_general(matmul_dtype),
               name=name)


def einsum(spec: str, a: jax.Array, b: jax.Array, matmul_dtype: Optional[str]) -> jax.Array:
  """jnp.einsum on `matmul_dtype` operands with a float32 result (None: the plain one);
  `Encoded` operands compute it themselves."""
  if isinstance(a, Encoded):
    return a.einsum(spec, b, lhs=True)
  if isinstance(b, Encoded):
    return b.einsum(spec, a, lhs=False)
  return jnp.einsum(spec, *_cast(matmul_dtype, a, b), **_float32_out(matmul_dtype))


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as in timm."""
  return nn.gelu(x, approximate=False)


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2, with quant points on both inputs."""
  hidden_dim: int
  out_dim: int
  point: PointFactory = Point
  matmul_dtype: Optional[str] = None  # operands of the matmuls; results stay float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.point(kind=POST_LN, name="fc1_in")(x)
    x = gelu(dense(self.hidden_dim, self.matmul_dtype, "fc1")(x))
    x = self.point(kind=ACT, name="fc2_in")(x)
    return dense(self.out_dim, self.matmul_dtype, "fc2")(x)


class Attention(nn.Module):
  """Multi-head self-attention with the two matmuls exposed.

  Sows the post-softmax attention `(B, heads, N, N)` as `intermediates/attn`, the
  attention output `attn @ v` merged over heads `(B, N, D)` as `intermediates/attn_v`, and
  the scores `(q / sqrt(head_dim)) k^T` before any bias as `intermediates/attn_scores`
  (what MimiQ's heads are compared on); sowing costs nothing unless the caller marks
  `intermediates` mutable and reads them.
  `bias` (added to the logits, broadcast over the batch) carries Swin's relative
  position bias and shift mask.
  """
  num_heads: int
  window_size: Optional[int] = None  # Swin: adds a learned relative position bias
  point: PointFactory = Point
  matmul_dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    b, n, d = x.shape
    if self.window_size is not None:
      ws = self.window_size
      table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                         ((2 * ws - 1) ** 2, self.num_heads))
      rel = table[relative_position_index(ws).reshape(-1)].reshape(n, n, self.num_heads)
      rel = rel.transpose(2, 0, 1)[None]
      bias = rel if bias is None else bias + rel
    hd = d // self.num_heads
    x = self.point(kind=POST_LN, name="qkv_in")(x)
    qkv = dense(3 * d, self.matmul_dtype, "qkv")(x).reshape(b, n, 3, self.num_heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, N, hd)
    q = self.point(kind=ACT, name="q")(q * hd ** -0.5)
    k = self.point(kind=ACT, name="k")(k)
    logits = einsum("bhqd,bhkd->bhqk", q, k, self.matmul_dtype)
    self.sow("intermediates", "attn_scores", logits)
    if bias is not None:
      logits = logits + bias
    attn = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "attn", attn)
    attn = self.point(kind=SOFTMAX, name="softmax")(attn)
    v = self.point(kind=ACT, name="v")(v)
    out = einsum("bhqk,bhkd->bqhd", attn, v, self.matmul_dtype).reshape(b, n, d)
    self.sow("intermediates", "attn_v", out)
    out = self.point(kind=ACT, name="proj_in")(out)
    return dense(d, self.matmul_dtype, "proj")(out)


def relative_position_index(window_size: int) -> np.ndarray:
  """(N, N) index into Swin's relative position table, N = window_size**2."""
  coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij"))
  coords = coords.reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window_size - 1)
  return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]
