"""Fashion-MNIST: the small, fully local test bed (ViT/Swin at 32x32, 10 classes).

Reads the four gzipped IDX files (Debian: `apt-get install dataset-fashion-mnist`, which
puts them in /usr/share/datasets/fashion-mnist/), or a TFDS `fashion_mnist` that is
already prepared (never downloads). Images are padded 28 -> 32 with zeros *before*
normalisation, so the border is the same "black" as the garment background, then
normalised with the training-set statistics

  MEAN = 0.2860406, STD = 0.3530242   (over the 60k original 28x28 training images, [0, 1])

The valid normalised pixel range, used to clamp synthetic images, is therefore
[(0 - MEAN) / STD, (1 - MEAN) / STD] = [-0.8103, 2.0224] (`pixel_range()`).
"""
from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

from spdfq_jax.models import zoo

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
MEAN = 0.2860406
STD = 0.3530242
IMG_SIZE = 32
NUM_CLASSES = 10
SPLIT_SIZES = {"train": 60000, "test": 10000}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def preprocessing(channels: int = 1) -> zoo.Preprocessing:
  """The evaluation transform as a `zoo.Preprocessing` (no resize, no crop: 32x32 in)."""
  return zoo.Preprocessing(input_size=IMG_SIZE, crop_pct=1.0, mean=(MEAN,) * channels,
                           std=(STD,) * channels, interpolation="none")


def pixel_range() -> tuple[float, float]:
  """(low, high) of a normalised pixel: the images of [0, 1] under (x - MEAN) / STD."""
  return (0.0 - MEAN) / STD, (1.0 - MEAN) / STD


def _read_idx(path: str) -> np.ndarray:
  """Parses one gzipped IDX file (big-endian header: magic, dims) into uint8."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _missing_message(directory: str, split: str) -> str:
  names = ", ".join(_FILES[split])
  return (f"Fashion-MNIST {split} files ({names}) not found in {directory}. Install them with "
          f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_DIR}), or copy the "
          "four .gz IDX files into a directory and pass it as `data_dir`.")


def _load_tfds(split: str, data_dir: Optional[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(uint8 images, labels) from an already prepared TFDS `fashion_mnist`, else None."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if not builder.is_prepared():
      return None
    ds = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  except Exception:  # pylint: disable=broad-except
    return None
  return ds["image"][..., 0], ds["label"]


def load_raw(split: str = "train", data_dir: Optional[str] = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 28, 28), int32 labels (N,)) of one split, unpadded, unnormalised.

  Looks in `data_dir` (default the Debian location); when the IDX files are not there
  and no directory was given, falls back to a prepared TFDS dataset.
  """
  if split not in _FILES:
    raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
  directory = data_dir or DEFAULT_DIR
  paths = [os.path.join(directory, name) for name in _FILES[split]]
  if all(os.path.exists(p) for p in paths):
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
  else:
    found = _load_tfds(split, None) if data_dir is None else None
    if found is None:
      raise FileNotFoundError(_missing_message(directory, split))
    images, labels = found
  if len(images) != SPLIT_SIZES[split] or len(labels) != len(images):
    raise ValueError(f"Fashion-MNIST {split}: expected {SPLIT_SIZES[split]} images and labels, "
                     f"got {len(images)} and {len(labels)} (truncated files in {directory}?)")
  return images, labels.astype(np.int32)


def normalise(images_u8: np.ndarray, channels: int = 1) -> np.ndarray:
  """uint8 (N, 28, 28) -> float32 (N, 32, 32, channels): zero-pad, scale to [0, 1], normalise."""
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  pad = (IMG_SIZE - images_u8.shape[1]) // 2
  x = np.pad(images_u8, ((0, 0), (pad, pad), (pad, pad)))
  x = (x.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
  x = x[..., None]
  return np.repeat(x, channels, axis=-1) if channels == 3 else x


def load(split: str = "train", data_dir: Optional[str] = None, channels: int = 1
         ) -> tuple[np.ndarray, np.ndarray]:
  """(float32 NHWC images (N, 32, 32, channels), int32 labels) of one split, normalised."""
  images, labels = load_raw(split, data_dir)
  return normalise(images, channels), labels



def check(split: str, data_dir: Optional[str] = None) -> None:
  """Raises FileNotFoundError / ValueError when the split is not readable."""
  load_raw(split, data_dir)


def calibration_images(num: int, seed: int, data_dir: Optional[str] = None, channels: int = 1
                       ) -> tuple[np.ndarray, np.ndarray]:
  """`num` training images drawn without replacement by `seed`, normalised."""
  images, labels = load_raw("train", data_dir)
  idx = np.sort(np.random.default_rng(seed).choice(len(images), num, replace=False))
  return normalise(images[idx], channels), labels[idx]
