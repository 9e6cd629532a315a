"""The step plan (synth/plan.py) pinned against the reference's draws and closed forms."""
import numpy as np
import pytest

from spdfq_jax import synth
from spdfq_jax.synth import layout as layout_lib
from spdfq_jax.synth import plan as plan_lib


def test_plan_draws_like_the_reference():
  """Offsets uniform on [-lim, lim] inclusive (15 then 30 px at 224 px), flips at p 0.5,
  one TV target for the run in U(2500, 3000), lr restarting each round."""
  cfg = synth.default_config("psaq")
  info = layout_lib.ModelInfo(False, 1, 4, (2,) * 4, (4,) * 4, 10, (224, 224, 3))
  plan = plan_lib.make_plan(cfg, info)
  first, second = plan.shift[:500], plan.shift[500:]
  assert first.min() == -15 and first.max() == 15
  assert second.min() == -30 and second.max() == 30
  assert 0.4 < plan.flip.mean() < 0.6
  assert 2500 <= plan.tv_target <= 3000
  assert plan.lr[0] == pytest.approx(0.2 / 100) and plan.lr[500] == pytest.approx(0.2 / 100)
  assert plan.lr[100] == pytest.approx(0.2)
  cfg.update(flip=False, jitter=(0, 0))
  plan = plan_lib.make_plan(cfg, info)
  assert not plan.flip.any() and not plan.shift.any()


def test_follows_jitter_rolls_the_image_by_whole_patches():
  """With the option the plan's offsets are the reference's draws rounded to the nearest
  multiple of the patch (16 px on a 14 x 14 grid at 224 px); without APA, or without the
  option, they are the draws themselves. Rules out rounding down, rounding by cells of the
  wrong size, and rounding runs that have no priors to follow."""
  info = layout_lib.ModelInfo(False, 1, 4, (2,) * 4, (14,) * 4, 10, (224, 224, 3))
  cfg = synth.default_config("spdfq")
  raw = plan_lib.make_plan(cfg, info).shift
  assert (raw % 16).any()
  cfg.apa_follows_jitter = True
  rounded = plan_lib.make_plan(cfg, info).shift
  np.testing.assert_array_equal(rounded, 16 * np.round(raw / 16))
  assert rounded.min() == -32 and rounded.max() == 32  # round 2 draws reach +-30 px
  cfg.apa = False
  np.testing.assert_array_equal(plan_lib.make_plan(cfg, info).shift, raw)
