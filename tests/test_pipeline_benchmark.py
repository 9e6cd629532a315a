"""benchmarks/pipeline.py's pieces: the generated image folder, the timing arithmetic, peaks."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top
from spdfq_jax.data import imagenet  # noqa: E402  pylint: disable=g-import-not-at-top


def test_image_folder_is_an_imagenet_validation_folder(tmp_path):
  assert pipeline.write_image_folder(str(tmp_path), 5, workers=2) == 5
  src = imagenet.source(str(tmp_path), "validation", kind="folder")
  items = list(src.items(0, len(src)))
  # Image i lies in the i-th WordNet class: labels 0..4, one image each.
  assert sorted(label for _, label in items) == [0, 1, 2, 3, 4]
  for path, label in items:
    assert os.path.basename(os.path.dirname(path)) == imagenet.wnids()[label]
    with Image.open(path) as im:
      assert im.format == "JPEG" and im.mode == "RGB"
      assert all(300 <= side <= 500 for side in im.size)
      assert np.asarray(im).std() > 10  # not a flat image
  # Existing files are kept: a larger folder only adds the missing images.
  before = os.path.getmtime(items[0][0])
  assert pipeline.write_image_folder(str(tmp_path), 7, workers=2) == 2
  assert os.path.getmtime(items[0][0]) == before
  assert len(imagenet.source(str(tmp_path), "validation", kind="folder")) == 7


def test_steady_rate_leaves_the_first_batch_out():
  # Batches done at t = 10 (compiled), 11, 13: 8 + 4 images in the 3 s after the first.
  assert pipeline.steady_rate([(10.0, 8), (11.0, 8), (13.0, 4)]) == 12 / 3
  assert pipeline.steady_rate([(10.0, 8)]) is None


def test_reconstruction_iterations_after_each_units_first():
  ticks = pipeline.Ticks(recon_units=[[0.0, 5.0, 5.5, 6.0], [10.0, 14.0, 14.25, 14.5]])
  # Later iterations: 0.5, 0.5 and 0.25, 0.25 -> 1.5 s over 4 iterations.
  assert pipeline.recon_later_iterations(ticks) == (1.5, 0.375)
  assert pipeline.recon_later_iterations(pipeline.Ticks(recon_units=[[0.0, 5.0]])) == (0.0, None)


def test_synthesis_step_seconds_come_from_the_device_reads():
  # Read every 2 steps: each read calls back for its 2 steps at once (a burst); only the
  # last callback of a burst marks finished steps.
  ticks = pipeline.Ticks(synth_start=1.0, synth_steps=[
      (0, 4.0), (1, 4.0002), (2, 5.0), (3, 5.0004), (4, 6.5), (5, 6.5001)])
  first, covered, later = ticks.step_seconds()
  assert first == pytest.approx(3.0002) and covered == 2
  assert later == pytest.approx([(5.0004 - 4.0002) / 2, (6.5001 - 5.0004) / 2])


def test_device_peaks():
  assert pipeline.device_peak("NVIDIA H100 80GB HBM3", "tf32") == ("NVIDIA H100 SXM", 494.7)
  assert pipeline.device_peak("NVIDIA H100 80GB HBM3", "bf16") == ("NVIDIA H100 SXM", 989.4)
  assert pipeline.device_peak("NVIDIA H100 PCIe", "fp32") == ("NVIDIA H100 PCIe", 51.2)
  assert pipeline.device_peak("NVIDIA H200", "tf32") == ("NVIDIA H200", 494.7)
  assert pipeline.device_peak("NVIDIA A100-SXM4-80GB", "fp32") == ("NVIDIA A100", 19.5)
  assert pipeline.device_peak("TPU v5 lite", "bf16") == ("TPU v5e", 197.0)
  assert pipeline.device_peak("TPU v4", "bf16") == ("TPU v4", 275.0)
  assert pipeline.device_peak("TPU v4", "tf32") is None  # no such arithmetic on a TPU
  assert pipeline.device_peak("cpu", "fp32") is None


def test_matmul_precision_follows_jax_setting():
  import jax  # pylint: disable=g-import-not-at-top
  assert pipeline.matmul_precision("gpu") == "tf32"
  assert pipeline.matmul_precision("tpu") == "bf16"
  assert pipeline.matmul_precision("cpu") == "fp32"
  with jax.default_matmul_precision("highest"):
    assert pipeline.matmul_precision("gpu") == "fp32"
