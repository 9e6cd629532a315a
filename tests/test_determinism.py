"""The same config and seed twice: byte-identical synthetic images and the same report."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import main_child  # noqa: E402  pylint: disable=wrong-import-position
from spdfq_jax import main  # noqa: E402  pylint: disable=wrong-import-position


def _run(workdir: str) -> tuple[dict, np.ndarray]:
  stages, c = main_child.tiny_pipeline(depth=2)
  c.num_images, c.export = 4, False
  c.synth.iterations, c.synth.warmup = 4, 1
  c.quant.recon.iters = 3
  c.eval.limit, c.eval.batch_size = 64, 32
  out = main.run(c, workdir, stages)
  return out, np.load(os.path.join(out["synth_dir"], main.SET_FILE))["images"]


@pytest.mark.slow
def test_same_config_twice_gives_identical_images_and_report(tmp_path):
  first, images_a = _run(str(tmp_path / "a"))
  second, images_b = _run(str(tmp_path / "b"))
  assert images_a.tobytes() == images_b.tobytes()
  assert main_child.stable(first) == main_child.stable(second)
  assert "prior_fit" in first and first["quant_top1"] >= 0
