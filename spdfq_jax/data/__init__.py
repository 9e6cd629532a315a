"""Datasets: ImageNet evaluation (imagenet.py) and the built-in test beds: Fashion-MNIST
(fashion_mnist.py, 32x32 grey) and Fashion-MNIST scenes (scenes.py, 48x48 RGB)."""
from __future__ import annotations

import types

TEST_BEDS = ("fashion_mnist", "scenes")


def test_bed(name: str) -> types.ModuleType:
  """The module of a built-in test bed. Each has IMG_SIZE, NUM_CLASSES, preprocessing(channels),
  check(split, dir), load(split, dir, channels) and calibration_images(num, seed, dir, channels)."""
  if name == "fashion_mnist":
    from spdfq_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
    return fashion_mnist
  if name == "scenes":
    from spdfq_jax.data import scenes  # pylint: disable=g-import-not-at-top
    return scenes
  raise ValueError(f"unknown test bed {name!r}: choose from {', '.join(TEST_BEDS)}")
