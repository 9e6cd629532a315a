"""Does the scenes ViT's attention find the object? CLS attention inside the item's box.

  python benchmarks/scenes_attention.py [--model scenes_vit | --model PATH] [--images 1000]
      [--figure docs/figures/scenes_attention.png]

For each block, the CLS token's attention over the patch tokens (heads averaged, the CLS
entry dropped and the rest renormalised), weighted by the share of each 4x4 patch that lies
inside the item's box, summed: the share of attention on the object. Chance is the box's
share of the image (attention spread evenly). Prints a markdown table per block, the mean
over the deeper half, and writes a figure of a few test scenes, their boxes and the deeper
half's CLS attention.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from spdfq_jax.data import scenes  # noqa: E402
from spdfq_jax.models import convert, load, native, taps  # noqa: E402
from spdfq_jax.synth import plots  # noqa: E402


def box_masks(boxes: np.ndarray, grid: int, size: int) -> np.ndarray:
  """(N, grid*grid) share of each patch's pixels inside the box (top, left, bottom, right)."""
  p = size // grid
  yy, xx = np.mgrid[0:size, 0:size]
  inside = ((yy[None] >= boxes[:, 0, None, None]) & (yy[None] < boxes[:, 2, None, None])
            & (xx[None] >= boxes[:, 1, None, None]) & (xx[None] < boxes[:, 3, None, None]))
  return inside.reshape(len(boxes), grid, p, grid, p).mean((2, 4)).reshape(len(boxes), -1)


def cls_attention(attn: np.ndarray) -> np.ndarray:
  """(B, heads, N, N) attention -> (B, N-1) CLS row over the patches, heads averaged,
  renormalised to sum 1."""
  row = attn[:, :, 0, 1:].mean(1)
  return row / row.sum(-1, keepdims=True)


def measure(module, params, images: np.ndarray, batch: int = 250) -> list[np.ndarray]:
  """Per block, the (N, patches) CLS attention of every image."""
  fn = jax.jit(lambda x: taps.apply_with_attention(module, {"params": params}, x)[1])
  per_block: list[list[np.ndarray]] = []
  for i in range(0, len(images), batch):
    attn = fn(images[i:i + batch])
    if not per_block:
      per_block = [[] for _ in attn]
    for b, a in enumerate(attn):
      per_block[b].append(cls_attention(np.asarray(a)))
  return [np.concatenate(b) for b in per_block]


def figure(pixels: np.ndarray, boxes: np.ndarray, maps: np.ndarray, path: str,
           tile: int = 144) -> None:
  """Pairs of tiles: the scene with its box (green), and the CLS attention heat map."""
  tiles = []
  for img, box, m in zip(pixels, boxes, maps):
    t = Image.fromarray(plots._upscale(img, tile))  # pylint: disable=protected-access
    f = tile // img.shape[0]
    ImageDraw.Draw(t).rectangle([box[1] * f, box[0] * f, box[3] * f - 1, box[2] * f - 1],
                                outline=(0, 255, 0), width=2)
    tiles += [np.asarray(t), plots.heatmap(m - m.min(), tile)]  # min-max: contrast
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(plots.tile_grid(tiles, 8)).save(path)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="scenes_vit", help="built-in asset name or native file")
  p.add_argument("--images", type=int, default=1000, help="first N test scenes")
  p.add_argument("--figure", default="runs/scenes_attention/attention.png")
  p.add_argument("--figure-images", type=int, default=8)
  a = p.parse_args()
  module, params = (load(a.model) if a.model in convert.ASSETS
                    else native.load(a.model)[:2])
  pixels, labels, boxes = scenes.load_with_boxes("test", indices=np.arange(a.images))
  x = scenes.normalise(pixels)
  maps = measure(module, params, x)
  grid = int(round(np.sqrt(maps[0].shape[1])))
  share = box_masks(boxes, grid, scenes.IMG_SIZE)
  chance = share.sum(-1) / share.shape[1]
  print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}; model {a.model}; {a.images} test scenes; "
        f"chance (box share of the image) {chance.mean():.3f}\n")
  print("| block | CLS attention inside the box | chance | ratio |")
  print("|---|---|---|---|")
  inside = [(m * share).sum(-1) for m in maps]
  for b, v in enumerate(inside):
    print(f"| {b + 1} | {v.mean():.3f} | {chance.mean():.3f} | {v.mean() / chance.mean():.2f} |")
  deep = np.mean(inside[len(maps) // 2:], 0)
  print(f"\nDeeper half (blocks {len(maps) // 2 + 1}-{len(maps)}): {deep.mean():.3f} inside the "
        f"box against {chance.mean():.3f} by chance ({deep.mean() / chance.mean():.2f}x); "
        f"above chance in {100 * (deep > chance).mean():.1f}% of the scenes.")
  n = a.figure_images
  figure(pixels[:n], boxes[:n], np.mean(maps[len(maps) // 2:], 0)[:n], a.figure)
  print(f"Figure: {a.figure}")


if __name__ == "__main__":
  main()
