"""Swin Transformer (v1), parameter layout mirroring timm >= 0.9 (NHWC stages)."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spdfq_jax.models.layers import (ACT, POST_LN, Attention, Conv, Mlp, Point, PointFactory,
                                     cast_conv, dense)

MASK_VALUE = -100.0  # what the reference implementation adds to cross-region logits


def window_partition(x: jax.Array, ws: int) -> jax.Array:
  """(B, H, W, C) -> (B * nW, ws * ws, C), windows in row-major order per image."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws * ws, c)


def window_reverse(windows: jax.Array, ws: int, h: int, w: int) -> jax.Array:
  """Inverse of `window_partition`."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def shift_attention_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
  """(nW, N, N) additive mask keeping attention inside each shifted region."""
  img = np.zeros((1, h, w, 1), np.float32)
  cnt = 0
  for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
    for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
      img[:, hs, wsl, :] = cnt
      cnt += 1
  win = window_partition(img, ws)[..., 0]  # (nW, N); numpy in, numpy out
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, MASK_VALUE, 0.0).astype(np.float32)


def window_and_shift(resolution: int, window: int, shift: int) -> tuple[int, int]:
  """Windows larger than the feature map shrink to it, and then do not shift."""
  if resolution <= window:
    return resolution, 0
  return window, shift


class SwinBlock(nn.Module):
  """(Shifted-)window attention block on (B, H, W, C) feature maps."""
  num_heads: int
  window_size: int
  shift_size: int
  mlp_ratio: float = 4.0
  eps: float = 1e-5
  point: PointFactory = Point
  matmul_dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    ws, shift = self.window_size, self.shift_size
    y = nn.LayerNorm(epsilon=self.eps, name="norm1")(x)
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    windows = window_partition(y, ws)
    bias = None
    if shift:
      mask = jnp.asarray(shift_attention_mask(h, w, ws, shift))[:, None]  # (nW, 1, N, N)
      bias = jnp.tile(mask, (b, 1, 1, 1))
    windows = Attention(self.num_heads, window_size=ws, point=self.point,
                        matmul_dtype=self.matmul_dtype, name="attn")(windows, bias)
    y = window_reverse(windows, ws, h, w)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + y
    y = nn.LayerNorm(epsilon=self.eps, name="norm2")(x)
    return x + Mlp(int(c * self.mlp_ratio), c, point=self.point,
                   matmul_dtype=self.matmul_dtype, name="mlp")(y)


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection followed by LayerNorm, NHWC out."""
  dim: int
  patch_size: int
  eps: float = 1e-5
  matmul_dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, normalize: bool = True) -> jax.Array:
    x = Conv(self.dim, (self.patch_size,) * 2, strides=self.patch_size, padding="VALID",
                conv_general_dilated=cast_conv(self.matmul_dtype), name="proj")(x)
    return nn.LayerNorm(epsilon=self.eps, name="norm")(x) if normalize else x


class PatchMerging(nn.Module):
  """2x2 neighbourhood -> channels (4C), LayerNorm, linear 4C -> 2C without bias."""
  out_dim: int
  eps: float = 1e-5
  point: PointFactory = Point
  matmul_dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
    x = nn.LayerNorm(epsilon=self.eps, name="norm")(x)
    x = self.point(kind=POST_LN, name="reduction_in")(x)
    return dense(self.out_dim, self.matmul_dtype, "reduction", use_bias=False)(x)


class Stage(nn.Module):
  depth: int
  dim: int
  num_heads: int
  resolution: int  # feature-map side after this stage's downsampling
  window_size: int
  downsample: bool
  mlp_ratio: float = 4.0
  eps: float = 1e-5
  point: PointFactory = Point
  remat: bool = False
  matmul_dtype: Optional[str] = None

  def setup(self):
    if self.downsample:
      self.merge = PatchMerging(self.dim, self.eps, self.point, self.matmul_dtype,
                                name="downsample")
    ws, shift = window_and_shift(self.resolution, self.window_size, self.window_size // 2)
    block = nn.remat(SwinBlock) if self.remat else SwinBlock
    self.blocks = [block(self.num_heads, ws, shift if i % 2 else 0, self.mlp_ratio, self.eps,
                         self.point, self.matmul_dtype, name=f"blocks_{i}")
                   for i in range(self.depth)]

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.downsample:
      x = self.merge(x)
    for blk in self.blocks:
      x = blk(x)
    return x


class SwinTransformer(nn.Module):
  """Swin classifier on NHWC float images; units: embed, layers.i.downsample,
  layers.i.blocks.j, head (see `swin_units`). `remat` and `matmul_dtype` as in
  `VisionTransformer`."""
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  eps: float = 1e-5
  point: PointFactory = Point
  remat: bool = False
  matmul_dtype: Optional[str] = None

  def setup(self):
    self.patch_in = self.point(kind=ACT, name="patch_in")
    self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, self.eps, self.matmul_dtype,
                                  name="patch_embed")
    res = self.img_size // self.patch_size
    stages = []
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      stages.append(Stage(depth, self.embed_dim * 2 ** i, heads, res // 2 ** i, self.window_size,
                          downsample=i > 0, mlp_ratio=self.mlp_ratio, eps=self.eps,
                          point=self.point, remat=self.remat, matmul_dtype=self.matmul_dtype,
                          name=f"layers_{i}"))
    self.layers = stages
    self.norm = nn.LayerNorm(epsilon=self.eps, name="norm")
    self.head_in = self.point(kind=ACT, name="head_in")
    self.head = dense(self.num_classes, self.matmul_dtype, "head")

  def embed(self, images: jax.Array) -> jax.Array:
    return self.patch_embed(self.patch_in(images))

  def classify(self, x: jax.Array) -> jax.Array:
    x = self.norm(x).mean(axis=(1, 2))
    return self.head(self.head_in(x))

  def run_unit(self, name: str, x: jax.Array) -> jax.Array:
    if name == "embed":
      return self.embed(x)
    if name == "head":
      return self.classify(x)
    parts = name.split(".")  # layers.i.downsample | layers.i.blocks.j
    stage = self.layers[int(parts[1])]
    if parts[2] == "downsample":
      return stage.merge(x)
    return stage.blocks[int(parts[3])](x)

  def unit_target(self, name: str, x: jax.Array) -> jax.Array:
    """What reconstruction matches for unit `name`: its output, except for `embed`, whose
    target is the patch convolution's output before the LayerNorm (I&S-ViT reconstructs
    the convolution as a layer of its own)."""
    if name == "embed":
      return self.patch_embed(self.patch_in(x), normalize=False)
    return self.run_unit(name, x)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.embed(images)
    for stage in self.layers:
      x = stage(x)
    return self.classify(x)


def swin_units(model: SwinTransformer) -> list[tuple[str, list[tuple[str, ...]]]]:
  """Unit names in forward order, each with the param subtrees it owns."""
  units = [("embed", [("patch_embed",)])]
  for i, depth in enumerate(model.depths):
    if i > 0:
      units.append((f"layers.{i}.downsample", [(f"layers_{i}", "downsample")]))
    units += [(f"layers.{i}.blocks.{j}", [(f"layers_{i}", f"blocks_{j}")]) for j in range(depth)]
  return units + [("head", [("norm",), ("head",)])]
