"""The configured dataset of a run: checked against the model before any stage runs, then
the evaluation batches (this process's share) and the real calibration images."""
from __future__ import annotations

from typing import Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from spdfq_jax import data as data_lib
from spdfq_jax import evaluate
from spdfq_jax.inputs import InputError
from spdfq_jax.models import zoo


class Data:
  """Evaluation batches and real calibration images of the configured dataset."""

  def __init__(self, config: ml_collections.ConfigDict, pre: zoo.Preprocessing, channels: int):
    self.config, self.pre, self.channels = config, pre, channels
    self._test_bed_test = None
    self._source = None

  @property
  def limit(self) -> Optional[int]:
    return self.config.eval.limit or None

  def check(self, module: zoo.Model, need_train: bool) -> None:
    """Fails now, naming data.dir and the fix, rather than after the synthesis: the
    evaluation split (and the training split for the real row) must be there and match
    the model's input and classes."""
    c = self.config
    if c.data.name in data_lib.TEST_BEDS:
      bed = data_lib.test_bed(c.data.name)
      channels = (1, 3) if c.data.name == "fashion_mnist" else (3,)
      if module.img_size != bed.IMG_SIZE or self.channels not in channels:
        raise InputError(
            f"data.name={c.data.name} gives {bed.IMG_SIZE}x{bed.IMG_SIZE} images with "
            f"{' or '.join(map(str, channels))} channels; the model takes {module.img_size}x"
            f"{module.img_size}x{self.channels}. Use the data.name of the model's test bed "
            "(fashion_mnist, scenes), or imagenet for an ImageNet model.")
      if module.num_classes != bed.NUM_CLASSES:
        raise InputError(f"data.name={c.data.name} has {bed.NUM_CLASSES} classes; "
                         f"the model predicts {module.num_classes}.")
      try:  # the evaluation split is read here once, and kept for eval_batches
        self._test_bed_test = bed.load("test", c.data.dir or None, self.channels)
        if need_train:
          bed.check("train", c.data.dir or None)
      except (FileNotFoundError, ValueError) as e:
        raise InputError(f"data.dir={c.data.dir!r}: {e}") from e
      return
    if self.channels != 3:
      raise InputError(f"the model takes {self.channels}-channel images; data.name={c.data.name}"
                       " gives RGB. Use a 3-channel checkpoint (or data.name=fashion_mnist "
                       "for a grey-scale test-bed model).")
    src = self.eval_source()
    if src.num_classes != module.num_classes:
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      if src.num_classes == imagenet.NUM_CLASSES:
        what = "ImageNet-1k (1000 classes, folders named by WordNet id)"
      else:
        what = (f"{src.num_classes} class folders not named by WordNet id, labelled 0.."
                f"{src.num_classes - 1} in sorted order")
      raise InputError(
          f"data.dir={c.data.dir!r}: {src.description} holds {what}, but the model predicts "
          f"{module.num_classes} classes. An ImageNet folder needs val/<wnid>/ folders "
          "(n01440764 ...; a subset of the 1000 is fine); otherwise use a checkpoint whose "
          "head matches the folder's classes.")
    if need_train:
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      try:
        imagenet.check_train(c.data.dir, kind=c.data.source, manual_dir=c.data.manual_dir or None)
      except FileNotFoundError as e:
        raise InputError(f"the real row needs training images: {e}") from e

  def eval_source(self):
    """The ImageNet evaluation split, opened once."""
    if self._source is None:
      c = self.config
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      try:
        self._source = imagenet.source(c.data.dir, "validation", kind=c.data.source,
                                       manual_dir=c.data.manual_dir or None, limit=self.limit)
      except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
      logging.info("evaluation data: %s (%d images)", self._source.description,
                   len(self._source))
    return self._source

  def eval_batches(self) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int]:
    """(this process's share of the evaluation set in batches, size of the whole set)."""
    c = self.config
    rows = evaluate.process_batch_size(c.eval.batch_size)
    share = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    if c.data.name in data_lib.TEST_BEDS:
      if self._test_bed_test is None:
        self._test_bed_test = data_lib.test_bed(c.data.name).load(
            "test", c.data.dir or None, self.channels)
      x, y = self._test_bed_test
      if self.limit:
        x, y = x[:self.limit], y[:self.limit]
      return evaluate.batches_from_arrays(x, y, rows, **share), len(x)
    if c.data.name == "imagenet":
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      src = self.eval_source()
      return imagenet.batches(src, self.pre, rows, workers=c.data.workers, **share), len(src)
    raise ValueError(f"data.name must be imagenet, fashion_mnist or scenes, got {c.data.name!r}")

  def real_images(self, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    c = self.config
    if c.data.name in data_lib.TEST_BEDS:
      return data_lib.test_bed(c.data.name).calibration_images(num, seed, c.data.dir or None,
                                                               self.channels)
    from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    return imagenet.calibration_images(c.data.dir, self.pre, num, seed, kind=c.data.source,
                                       manual_dir=c.data.manual_dir or None,
                                       workers=c.data.workers)
