"""Fashion-MNIST scenes: a 48x48 RGB test bed where the object has to be found.

Each scene places one Fashion-MNIST item, coloured, at a random position and scale over a
cluttered background. The label is the item's class (10 classes). A ViT with patch 4 sees a
12x12 grid, as ImageNet ViTs see 14x14: the object covers a varying part of the grid, and the
rest is clutter that the model must learn to ignore, so attention has something to find
and calibration data has structure to carry.

Recipe of scene `i` of a split (everything drawn from `np.random.default_rng((seed, split,
i))`, so a scene is a pure function of (seed, split, index) and any subset is cheap):

1. background: a linear gradient between two random colours in a random direction, plus a
   smooth colour texture (4x4 to 8x8 random grid, bilinearly upsampled, amplitude 35) and
   pixel grain (sd 6);
2. two to four faded fragments of other items of the same split (any class): a random crop
   of 12-28 px of the item, resized by 0.6-1.2, in a random colour, blended at opacity
   0.2-0.45;
3. the item: the 28x28 Fashion-MNIST image resized to 22-40 px (bilinear), fully inside
   the canvas, in a random saturated colour (far from the background's mean colour) whose
   brightness follows the item's grey levels, with opacity min(1, grey / 64).

Train scenes use the 60k training items, test scenes the 10k test items. Training draws
fresh scenes each epoch (`seed` + epoch), which is the translation and scale augmentation.
"""
from __future__ import annotations

import colorsys
import os
from typing import Optional

import numpy as np
from PIL import Image

from spdfq_jax.data import fashion_mnist
from spdfq_jax.models import zoo

IMG_SIZE = 48
NUM_CLASSES = fashion_mnist.NUM_CLASSES
CLASS_NAMES = fashion_mnist.CLASS_NAMES
SPLIT_SIZES = fashion_mnist.SPLIT_SIZES
ITEM_SIZES = (22, 40)           # side of the resized 28x28 item, inclusive
FRAGMENTS = (2, 4)              # faded fragments of other items per scene, inclusive
TEST_SEED = 0                   # the fixed test scenes
# Channel statistics of 10k training scenes (seed 0), [0, 1] scale; `tests/test_scenes.py`
# recomputes them.
MEAN = (0.4337, 0.4319, 0.4332)
STD = (0.2209, 0.2204, 0.2207)
_SPLIT_IDS = {"train": 0, "test": 1}


def preprocessing(channels: int = 3) -> zoo.Preprocessing:
  """The evaluation transform (48x48 in, no resize or crop, per-channel normalisation)."""
  if channels != 3:
    raise ValueError(f"scenes are RGB: channels must be 3, got {channels}")
  return zoo.Preprocessing(input_size=IMG_SIZE, crop_pct=1.0, mean=MEAN, std=STD,
                           interpolation="none")


def pixel_range() -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (low, high) of a normalised pixel."""
  mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
  return (0.0 - mean) / std, (1.0 - mean) / std


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear resize of a float (H, W) array in [0, 255]."""
  return np.asarray(Image.fromarray(image.astype(np.float32), mode="F")
                    .resize((w, h), Image.BILINEAR), np.float32)


def _colour(rng: np.random.Generator, saturation: tuple[float, float],
            value: tuple[float, float]) -> np.ndarray:
  rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
  return np.asarray(rgb, np.float32) * 255.0


def _background(rng: np.random.Generator) -> np.ndarray:
  s = IMG_SIZE
  c0, c1 = _colour(rng, (0.0, 0.8), (0.2, 0.95)), _colour(rng, (0.0, 0.8), (0.2, 0.95))
  angle = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
  t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / np.sqrt(0.5) + 0.5
  bg = c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)
  g = int(rng.integers(4, 9))
  coarse = rng.normal(0.0, 1.0, (g, g, 3)).astype(np.float32) * 35.0
  bg += np.stack([_resize(coarse[..., c] + 128.0, s, s) - 128.0 for c in range(3)], -1)
  bg += rng.normal(0.0, 6.0, (s, s, 3)).astype(np.float32)
  return bg


def _paste(canvas: np.ndarray, layer: np.ndarray, alpha: np.ndarray, top: int, left: int
           ) -> None:
  """Alpha-blends `layer` (h, w, 3) into `canvas` at (top, left), clipped to the canvas."""
  h, w = alpha.shape
  t0, l0 = max(top, 0), max(left, 0)
  t1, l1 = min(top + h, IMG_SIZE), min(left + w, IMG_SIZE)
  if t1 <= t0 or l1 <= l0:
    return
  a = alpha[t0 - top:t1 - top, l0 - left:l1 - left, None]
  region = canvas[t0:t1, l0:l1]
  canvas[t0:t1, l0:l1] = region * (1 - a) + layer[t0 - top:t1 - top, l0 - left:l1 - left] * a


def _fragment(canvas: np.ndarray, rng: np.random.Generator, item: np.ndarray) -> None:
  ch, cw = (int(v) for v in rng.integers(12, 29, 2))
  y, x = int(rng.integers(0, 29 - ch)), int(rng.integers(0, 29 - cw))
  scale = rng.uniform(0.6, 1.2)
  h, w = max(int(round(ch * scale)), 2), max(int(round(cw * scale)), 2)
  grey = _resize(item[y:y + ch, x:x + cw].astype(np.float32), h, w)
  alpha = np.clip(grey / 64.0, 0, 1) * rng.uniform(0.2, 0.45)
  layer = _colour(rng, (0.3, 1.0), (0.3, 1.0)) * (0.4 + 0.6 * grey[..., None] / 255.0)
  top = int(rng.integers(-h // 2, IMG_SIZE - h // 2))
  left = int(rng.integers(-w // 2, IMG_SIZE - w // 2))
  _paste(canvas, layer, alpha, top, left)


def _item_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
  """A saturated colour at least 120 (RGB distance) from the background's mean."""
  for _ in range(16):
    c = _colour(rng, (0.5, 1.0), (0.5, 1.0))
    if np.linalg.norm(c - background_mean) >= 120:
      return c
  return np.where(background_mean > 127, 0.0, 255.0).astype(np.float32)


def scene(items: np.ndarray, index: int, seed: int, split: str
          ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """(uint8 (48, 48, 3) scene of item `index`, its box (top, left, bottom, right), exclusive)."""
  rng = np.random.default_rng((seed, _SPLIT_IDS[split], index))
  canvas = _background(rng)
  for _ in range(int(rng.integers(FRAGMENTS[0], FRAGMENTS[1] + 1))):
    other = int(rng.integers(0, len(items) - 1))
    _fragment(canvas, rng, items[other + (other >= index)])
  size = int(rng.integers(ITEM_SIZES[0], ITEM_SIZES[1] + 1))
  grey = np.clip(_resize(items[index].astype(np.float32), size, size), 0, 255)
  top, left = (int(v) for v in rng.integers(0, IMG_SIZE - size + 1, 2))
  colour = _item_colour(rng, canvas.mean((0, 1)))
  alpha = np.clip(grey / 64.0, 0, 1)
  _paste(canvas, colour * (0.35 + 0.65 * grey[..., None] / 255.0), alpha, top, left)
  rows, cols = np.nonzero(alpha > 0.5)
  box = ((top + rows.min(), left + cols.min(), top + rows.max() + 1, left + cols.max() + 1)
         if len(rows) else (top, left, top + size, left + size))
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8), tuple(int(v) for v in box)


def make(items: np.ndarray, seed: int, split: str, indices: Optional[np.ndarray] = None
         ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 scenes (N, 48, 48, 3), int32 boxes (N, 4)) of `indices` (default all items)."""
  indices = np.arange(len(items)) if indices is None else np.asarray(indices)
  out = np.empty((len(indices), IMG_SIZE, IMG_SIZE, 3), np.uint8)
  boxes = np.empty((len(indices), 4), np.int32)
  for j, i in enumerate(indices):
    out[j], boxes[j] = scene(items, int(i), seed, split)
  return out, boxes


def load_with_boxes(split: str = "test", data_dir: Optional[str] = None,
                    seed: Optional[int] = None, cache_dir: Optional[str] = None,
                    indices: Optional[np.ndarray] = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(uint8 scenes, int32 labels, int32 item boxes) of one split (or of its `indices`).

  `seed` defaults to the fixed test-scene seed. With `cache_dir`, a whole split is stored
  there as an .npz on first use (write-then-rename) and read back after.
  """
  seed = TEST_SEED if seed is None else seed
  items, labels = fashion_mnist.load_raw(split, data_dir)
  path = (os.path.join(cache_dir, f"scenes-{split}-{seed}.npz")
          if cache_dir and indices is None else None)
  if path and os.path.exists(path):
    with np.load(path) as f:
      return f["images"], f["labels"], f["boxes"]
  images, boxes = make(items, seed, split, indices)
  labels = labels if indices is None else labels[np.asarray(indices)]
  if path:
    from spdfq_jax import checkpoint  # pylint: disable=g-import-not-at-top
    os.makedirs(cache_dir, exist_ok=True)
    with checkpoint.atomic_path(path) as tmp:
      np.savez(tmp, images=images, labels=labels, boxes=boxes)
  return images, labels, boxes


def load_raw(split: str = "test", data_dir: Optional[str] = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 scenes (N, 48, 48, 3), int32 labels) of one split's fixed scenes."""
  images, labels, _ = load_with_boxes(split, data_dir)
  return images, labels


def check(split: str, data_dir: Optional[str] = None) -> None:
  """Raises FileNotFoundError / ValueError when the split's items are not readable."""
  fashion_mnist.load_raw(split, data_dir)


def calibration_images(num: int, seed: int, data_dir: Optional[str] = None, channels: int = 3
                       ) -> tuple[np.ndarray, np.ndarray]:
  """`num` training scenes (items drawn without replacement by `seed`), normalised."""
  items, labels = fashion_mnist.load_raw("train", data_dir)
  idx = np.sort(np.random.default_rng(seed).choice(len(items), num, replace=False))
  images, _ = make(items, TEST_SEED, "train", idx)
  return normalise(images, channels), labels[idx]


def normalise(images_u8: np.ndarray, channels: int = 3) -> np.ndarray:
  """uint8 (N, 48, 48, 3) -> float32 normalised NHWC."""
  if channels != 3:
    raise ValueError(f"scenes are RGB: channels must be 3, got {channels}")
  mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
  return (images_u8.astype(np.float32) / 255.0 - mean) / std


def load(split: str = "test", data_dir: Optional[str] = None, channels: int = 3,
         seed: Optional[int] = None, cache_dir: Optional[str] = None
         ) -> tuple[np.ndarray, np.ndarray]:
  """(float32 normalised scenes (N, 48, 48, 3), int32 labels) of one split."""
  images, labels, _ = load_with_boxes(split, data_dir, seed, cache_dir)
  return normalise(images, channels), labels
