"""ViT and DeiT (optionally distilled), parameter layout mirroring timm."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from typing import Optional

from spdfq_jax.models.layers import (ACT, POST_LN, Attention, Conv, Mlp, Point, PointFactory,
                                     cast_conv, dense)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  eps: float = 1e-6
  point: PointFactory = Point
  matmul_dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    y = nn.LayerNorm(epsilon=self.eps, name="norm1")(x)
    x = x + Attention(self.num_heads, point=self.point, matmul_dtype=self.matmul_dtype,
                      name="attn")(y)
    y = nn.LayerNorm(epsilon=self.eps, name="norm2")(x)
    return x + Mlp(int(d * self.mlp_ratio), d, point=self.point,
                   matmul_dtype=self.matmul_dtype, name="mlp")(y)


class VisionTransformer(nn.Module):
  """ViT / DeiT classifier on NHWC float images.

  The forward pass is a chain of *units* (`embed`, `blocks.i`, `head`) so that
  block-wise reconstruction can run and train one unit at a time; `__call__` is
  their composition. `distilled=True` adds DeiT's distillation token and head; the
  two heads are averaged, as timm does at inference.

  `remat` and `matmul_dtype` change how the model runs, not its parameters or
  architecture: `remat` recomputes each block's activations in the backward pass
  (`nn.remat`) instead of storing them; `matmul_dtype` ('bfloat16') gives every matmul
  operands of that type and a float32 result.
  """
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  distilled: bool = False
  eps: float = 1e-6
  point: PointFactory = Point
  remat: bool = False
  matmul_dtype: Optional[str] = None
  # > 0: each image keeps only its first `sparse_patches` patches holding a non-zero value
  # (with the prefix tokens), as SMI's reference calibrates on its masked images, whose
  # pruned patches are exactly zero. 0: every patch.
  sparse_patches: int = 0

  def setup(self):
    self.patch_embed = Conv(self.width, (self.patch_size,) * 2, strides=self.patch_size,
                               padding="VALID", conv_general_dilated=cast_conv(self.matmul_dtype),
                               name="patch_embed")
    self.patch_in = self.point(kind=ACT, name="patch_in")
    self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
    if self.distilled:
      self.dist_token = self.param("dist_token", nn.initializers.zeros, (1, 1, self.width))
    grid = self.img_size // self.patch_size
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (1, grid * grid + self.num_prefix_tokens, self.width))
    block = nn.remat(Block) if self.remat else Block
    self.blocks = [block(self.num_heads, self.mlp_ratio, self.eps, self.point, self.matmul_dtype,
                         name=f"blocks_{i}") for i in range(self.depth)]
    self.norm = nn.LayerNorm(epsilon=self.eps, name="norm")
    self.head_in = self.point(kind=ACT, name="head_in")
    self.head = dense(self.num_classes, self.matmul_dtype, "head")
    if self.distilled:
      self.head_dist_in = self.point(kind=ACT, name="head_dist_in")
      self.head_dist = dense(self.num_classes, self.matmul_dtype, "head_dist")

  @property
  def num_prefix_tokens(self) -> int:
    return 2 if self.distilled else 1

  def embed(self, images: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
    """Images -> tokens (prefix tokens first), position embedding added. `keep` (B, K)
    gathers those token indices after the position embedding (SMI's sparse forward: the
    pruned tokens cost nothing downstream)."""
    x = self.patch_embed(self.patch_in(images))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
    prefix = [jnp.broadcast_to(t, (b, 1, d)).astype(x.dtype) for t in prefix]
    x = jnp.concatenate(prefix + [x], axis=1) + self.pos_embed
    if keep is None and self.sparse_patches:
      keep = self.nonzero_tokens(images)
    if keep is not None:
      x = jnp.take_along_axis(x, keep[:, :, None].astype(jnp.int32), axis=1)
    return x

  def nonzero_tokens(self, images: jax.Array) -> jax.Array:
    """(B, prefix + sparse_patches) token indices: the prefix tokens, then the patches with
    a non-zero value in ascending order (the reference's `find_non_zero_patches`)."""
    b, h, w, c = images.shape
    p = self.patch_size
    cells = images.reshape(b, h // p, p, w // p, p, c)
    nonzero = (cells != 0).any(axis=(2, 4, 5)).reshape(b, -1)
    order = jnp.argsort(~nonzero, axis=1, stable=True)[:, :self.sparse_patches]
    prefix = jnp.broadcast_to(jnp.arange(self.num_prefix_tokens), (b, self.num_prefix_tokens))
    return jnp.concatenate([prefix, order + self.num_prefix_tokens], axis=1)

  def classify(self, x: jax.Array) -> jax.Array:
    x = self.norm(x)
    logits = self.head(self.head_in(x[:, 0]))
    if self.distilled:
      logits = (logits + self.head_dist(self.head_dist_in(x[:, 1]))) / 2
    return logits

  def run_unit(self, name: str, x: jax.Array) -> jax.Array:
    """Applies one unit: 'embed' (images -> tokens), 'blocks.i', or 'head'."""
    if name == "embed":
      return self.embed(x)
    if name == "head":
      return self.classify(x)
    return self.blocks[int(name.split(".")[1])](x)

  def __call__(self, images: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
    x = self.embed(images, keep)
    for block in self.blocks:
      x = block(x)
    return self.classify(x)


def vit_units(model: VisionTransformer) -> list[tuple[str, list[tuple[str, ...]]]]:
  """Unit names in forward order, each with the param subtrees it owns."""
  embed = [("patch_embed",), ("cls_token",), ("pos_embed",)]
  head = [("norm",), ("head",)]
  if model.distilled:
    embed.append(("dist_token",))
    head.append(("head_dist",))
  return ([("embed", embed)] + [(f"blocks.{i}", [(f"blocks_{i}",)]) for i in range(model.depth)]
          + [("head", head)])
