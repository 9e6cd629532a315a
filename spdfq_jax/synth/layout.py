"""What the synthesis needs to know about the model's attention layout (read by shape
evaluation), the APA blocks, and the valid pixel range of normalised images."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spdfq_jax.models import taps
from spdfq_jax.models import zoo


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the losses need to know about the model's attention layout."""
  swin: bool
  prefix: int  # tokens before the patch tokens (CLS, distillation); 0 for Swin
  depth: int  # number of attention blocks L
  heads: tuple[int, ...]  # per block
  grid: tuple[int, ...]  # per block: patch-grid side (ViT) or window side (Swin)
  num_classes: int
  image_shape: tuple[int, int, int]


def model_info(module, params: Any, cfg: ml_collections.ConfigDict) -> ModelInfo:
  """Reads the layout by shape evaluation (no FLOPs) plus the module's fields."""
  swin = zoo.family(module) == "swin"
  size = cfg.image_size or module.img_size
  channels = cfg.channels or zoo.in_channels(module, params)
  shape = (int(size), int(size), int(channels))
  logits, attns, _ = jax.eval_shape(
      lambda p, x: taps.apply_with_attention(module, {"params": p}, x), params,
      jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
  prefix = 0 if swin else module.num_prefix_tokens
  grid = tuple(math.isqrt(a.shape[-1] - prefix) for a in attns)
  num_classes = cfg.num_classes or int(logits.shape[-1])
  return ModelInfo(swin, prefix, len(attns), tuple(int(a.shape[1]) for a in attns), grid,
                   num_classes, shape)


def apa_block_indices(info: ModelInfo, cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """0-based blocks that APA aligns (and every method is measured on): the deeper half
  (1-based l >= L/2) or all."""
  if cfg.apa_blocks == "all":
    return tuple(range(info.depth))
  if cfg.apa_blocks != "deep":
    raise ValueError(f"apa_blocks must be 'deep' or 'all', got {cfg.apa_blocks!r}")
  return tuple(l for l in range(info.depth) if l + 1 >= info.depth / 2)


def pixel_range(cfg: ml_collections.ConfigDict, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (lo, hi) of normalised images whose pixels lie in [0, 1]."""
  mean = np.broadcast_to(np.asarray(cfg.mean, np.float32), (channels,))
  std = np.broadcast_to(np.asarray(cfg.std, np.float32), (channels,))
  return (0 - mean) / std, (1 - mean) / std

