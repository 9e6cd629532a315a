"""PNG figures of a synthesis run: the image grid and APA prior vs achieved attention."""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from spdfq_jax import checkpoint
from spdfq_jax.synth.objective import apa_maps


def denormalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalised NHWC -> uint8 pixels (grey images become RGB)."""
  c = images.shape[-1]
  x = images * np.broadcast_to(np.asarray(std, np.float32), (c,)) + np.broadcast_to(
      np.asarray(mean, np.float32), (c,))
  x = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
  return np.repeat(x, 3, -1) if c == 1 else x


def _upscale(tile: np.ndarray, size: int) -> np.ndarray:
  f = max(1, size // max(tile.shape[:2]))
  return np.repeat(np.repeat(tile, f, 0), f, 1)


def tile_grid(tiles: list[np.ndarray], ncol: int, pad: int = 2) -> np.ndarray:
  """Equal-size RGB tiles -> one RGB image, white gaps."""
  h, w = tiles[0].shape[:2]
  nrow = -(-len(tiles) // ncol)
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
  for i, t in enumerate(tiles):
    r, c = divmod(i, ncol)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = t
  return out


def image_grid(images: np.ndarray, mean, std, path: str, ncol: int = 8, tile: int = 96) -> None:
  """Writes the de-normalised images as one PNG grid."""
  tiles = [_upscale(t, tile) for t in denormalise(images, mean, std)]
  _save_png(tile_grid(tiles, min(ncol, len(tiles))), path)


def _save_png(pixels: np.ndarray, path: str) -> None:
  with checkpoint.atomic_path(path) as tmp:
    Image.fromarray(pixels).save(tmp)


def heatmap(values: np.ndarray, size: int) -> np.ndarray:
  """(G,) map on a square grid -> RGB tile (black -> red -> yellow -> white), max-normalised."""
  g = int(round(np.sqrt(values.size)))
  v = values.reshape(g, g) / max(float(values.max()), 1e-12)
  rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
  return _upscale((rgb * 255).astype(np.uint8), size)


def attention_figure(images: np.ndarray, prior: np.ndarray, achieved: np.ndarray, mean, std,
                     path: str, num_images: int = 4, num_heads: int = 3, tile: int = 96) -> None:
  """Rows = images; columns = the image, then (prior, achieved) per head of one block; each
  achieved map carries its Pearson correlation r with the prior (the prior fit)."""
  n = min(num_images, len(images))
  h = min(num_heads, prior.shape[1])
  pix = denormalise(images[:n], mean, std)
  tiles = []
  for i in range(n):
    tiles.append(_upscale(pix[i], tile))
    for j in range(h):
      r = np.corrcoef(prior[i, j], achieved[i, j])[0, 1]
      tiles += [heatmap(prior[i, j], tile), _caption(heatmap(achieved[i, j], tile), f"r={r:.2f}")]
  size = max(max(t.shape[:2]) for t in tiles)
  tiles = [np.pad(t, ((0, size - t.shape[0]), (0, size - t.shape[1]), (0, 0)),
                  constant_values=255) for t in tiles]
  _save_png(tile_grid(tiles, 1 + 2 * h), path)


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
  """The tile with `text` (the prior fit) in its top-left corner, white on black."""
  img = Image.fromarray(tile)
  draw = ImageDraw.Draw(img)
  box = draw.textbbox((1, 1), text)
  draw.rectangle(box, fill=(0, 0, 0))
  draw.text((1, 1), text, fill=(255, 255, 255))
  return np.asarray(img)


def save_figures(directory: str, module, params: Any, result, cfg, info) -> None:
  """grid.png always; attention.png (last APA block) when the run has priors (every
  method: for those without APA it shows what chance looks like)."""
  image_grid(result.images, cfg.mean, cfg.std, os.path.join(directory, "grid.png"))
  if not result.priors:
    return
  n = min(4, len(result.images))
  last = result.apa_blocks[-1]
  got = jax.jit(lambda p, x: apa_maps(module, p, x, info, (last,)))(params, result.images[:n])[0]
  attention_figure(result.images[:n], result.priors[-1][:n], np.asarray(got), cfg.mean, cfg.std,
                   os.path.join(directory, "attention.png"))
