"""Quantizers, percentile calibration, masked evaluation and resumable reconstruction,
pinned against values worked out by hand or with numpy (never the code under test)."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdfq_jax import evaluate
from spdfq_jax import quant
from spdfq_jax.models import zoo
from spdfq_jax.quant import point_stats
from spdfq_jax.quant import quantizers as Q

recon_lib = importlib.import_module("spdfq_jax.quant.reconstruct")  # the module, not the function


# --- log2 / log-sqrt2 levels and rounding boundaries -------------------------------------

@pytest.mark.parametrize("step", [1.0, 0.5])  # log2 (FQ-ViT), log-sqrt2 (RepQ-ViT)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_log2_levels_boundaries_and_underflow(bits, step):
  """Levels are s * 2^(-step q), q = 0..2^b - 1; rounding is to the nearest level in the log
  domain, so levels q and q+1 meet at s * 2^(-step (q + 1/2)); at and above s the top level;
  below the smallest level, values at least half a log step above where a level 2^b would
  sit round to that smallest level and the rest to 0."""
  s = 0.75  # not a power of two: levels scale with it
  n = 2 ** bits
  level = lambda q: s * 2.0 ** (-step * q)
  d = 1e-3  # relative nudge off a boundary: ~1.4e-3 in log2, far above float32 error
  cases = [(0.0, 0.0), (s, s), (s * 1.001, s), (4 * s, s), (1e3, s)]
  cases += [(level(q), level(q)) for q in range(n)]
  for q in range(n - 1):  # boundary between level q and level q+1
    edge = s * 2.0 ** (-step * (q + 0.5))
    cases += [(edge * (1 + d), level(q)), (edge * (1 - d), level(q + 1))]
  smallest = s * 2.0 ** (-step * (n - 1))
  last_edge = s * 2.0 ** (-step * (n - 0.5))  # between the smallest level and 0
  cases += [(last_edge * (1 + d), smallest), (last_edge * (1 - d), 0.0),
            (smallest / 4, 0.0), (1e-30, 0.0)]
  x, want = np.array(cases, np.float64).T
  got = np.asarray(Q.log2_quant(jnp.asarray(x, jnp.float32), jnp.float32(s), bits, step))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert len(np.unique(got[got > 0])) == n  # exactly 2^b nonzero levels reached


# --- percentiles ---------------------------------------------------------------------------

def test_percentile_range_matches_numpy():
  """Per-channel (100 - p)-th and p-th percentiles equal numpy's (linear interpolation), for
  heavy-tailed data where p = 99.99 differs from p = 0.9999 and from the min / max."""
  rng = np.random.RandomState(0)
  x = (rng.standard_t(2, size=(5000, 3)) * [1.0, 3.0, 0.5]).astype(np.float32)
  for pct in (99.99, 99.0):
    lo, hi = Q.percentile_range(jnp.asarray(x), (0,), pct)
    want_lo, want_hi = np.percentile(x.astype(np.float64), [100 - pct, pct], axis=0)
    # rtol: jnp interpolates at a float32 position, a few 1e-4 of an index off in the tail
    np.testing.assert_allclose(lo, want_lo, rtol=1e-3)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-3)
    assert np.all(want_hi < x.max(0)) and np.all(want_lo > x.min(0))
  # The same through the weight-range entry point: scale = (hi - lo) / (2^b - 1).
  s, _ = Q.quantize_tensor(jnp.asarray(x), bits=4, granularity="channel", method="percentile")
  want_lo, want_hi = np.percentile(x.astype(np.float64), [0.01, 99.99], axis=0)
  np.testing.assert_allclose(s, (want_hi - want_lo) / 15, rtol=1e-3)


def _calib_images():
  """Images (the patch embedding's input, a per-tensor activation) valued on the centres of
  the calibration histogram's bins over [0, 2]: one 0, one outlier 2, twenty values at the
  centre of bin j and the rest below bin j. The 99.99th percentile of 32 * 16 * 16 * 3 =
  24576 values then lies inside that block of twenty (numpy's two interpolation neighbours
  and the histogram's count threshold all fall there), halfway between two bin edges."""
  nbins = point_stats.NBINS
  w = 2.0 / nbins
  j = 3 * nbins // 4
  n = 32 * 16 * 16 * 3
  rng = np.random.RandomState(0)
  v = (rng.randint(0, j, n) + 0.5) * w
  v[:22] = [0.0, 2.0] + [(j + 0.5) * w] * 20
  return rng.permutation(v).reshape(32, 16, 16, 3).astype(np.float32), w


def test_activation_percentile_calibration_matches_numpy():
  """The percentile a calibrated range ends at is numpy's, rounded outward to the edge of its
  histogram bin: [p, p + w] for the upper end, [p - w, p] for the lower (w = bin width).
  The data puts p mid-bin, so an edge one bin off lands outside."""
  module = zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=2,
                          num_heads=2)
  images, w = _calib_images()
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  cfg = quant.default_config(8, 8, preset="calib", a_method="percentile", percentile=99.99,
                             keep_fp=[], calib_order="fp")
  # All-positive images: the range is [0, hi], so scale = hi / 255 with zero point 0.
  p_hi = np.percentile(images.astype(np.float64), 99.99)
  assert p_hi < images.max() - 100 * w  # the outlier is clipped, not kept
  st = quant.calibrate(module, params, images, cfg)["patch_in"]
  hi = float(st["scale"]) * 255
  assert float(st["zero"]) == 0.0
  assert p_hi <= hi <= p_hi + w, (p_hi, hi, w)
  # Mirrored images: the range is [lo, 0], scale = -lo / 255 with zero point 255.
  neg = -images
  p_lo = np.percentile(neg.astype(np.float64), 100 - 99.99)
  st = quant.calibrate(module, params, neg, cfg)["patch_in"]
  lo = -float(st["scale"]) * 255
  assert float(st["zero"]) == 255.0
  assert p_lo - w <= lo <= p_lo, (p_lo, lo, w)


# --- evaluation with a padded last batch ---------------------------------------------------

@pytest.mark.parametrize("last_rank", [2, 1])
def test_evaluate_counts_padded_batch_once(last_rank):
  """7 images in batches of 4: the last batch is padded with copies of image 7. The rank of
  each true label among the logits is set by hand; the last image is a top-5-only hit (or a
  top-1 hit), so counting the padding would raise top-5 (or top-1) above the hand count."""
  ranks = [1, 3, 7, 1, 6, 5, last_rank]  # 1 = the largest logit
  rng = np.random.RandomState(0)
  logits = np.stack([rng.permutation(10) for _ in ranks]).astype(np.float32)
  labels = np.array([np.argsort(-row)[r - 1] for row, r in zip(logits, ranks)], np.int32)
  top1 = 2 + (last_rank == 1)  # ranks 1, 1 (+ the last)
  top5 = 5  # ranks 1, 3, 1, 5 and the last
  out = evaluate.evaluate(lambda x: x, evaluate.batches_from_arrays(logits, labels, 4), 4)
  assert out["count"] == 7
  assert out["top1"] == pytest.approx(100.0 * top1 / 7)
  assert out["top5"] == pytest.approx(100.0 * top5 / 7)


# --- reconstruction resume with minibatches ------------------------------------------------

def test_reconstruction_resume_with_minibatches(tmp_path, monkeypatch):
  """Batches of 3 out of 8 images: each step trains on a random subset, so the resumed run
  must draw the same subsets for the unit it restarts (interrupted halfway through
  blocks.0, the second unit) as the uninterrupted run did."""
  module = zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=1,
                          num_heads=2)
  images = np.random.RandomState(0).randn(8, 16, 16, 3).astype(np.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  cfg = quant.default_config(4, 4, preset="calib", recon_iters=4, recon_lr=1e-2,
                             recon_batch_size=3)
  qs = quant.calibrate(module, params, images, cfg)
  ws = quant.weight_state(params, cfg)
  full, log = quant.reconstruct(module, params, qs, ws, images, cfg, progress=False)
  assert [e["unit"] for e in log] == ["embed", "blocks.0", "head"]

  step = recon_lib._step
  calls = []
  def interrupted(*args, **kw):
    calls.append(args[1])
    if calls.count("blocks.0") == 3:
      raise KeyboardInterrupt
    return step(*args, **kw)
  monkeypatch.setattr(recon_lib, "_step", interrupted)
  with pytest.raises(KeyboardInterrupt):
    quant.reconstruct(module, params, qs, ws, images, cfg, workdir=str(tmp_path), progress=False)
  monkeypatch.setattr(recon_lib, "_step", step)
  assert calls == ["embed"] * 4 + ["blocks.0"] * 3
  resumed, log2 = quant.reconstruct(module, params, qs, ws, images, cfg, workdir=str(tmp_path),
                                    progress=False)
  assert [e["unit"] for e in log2] == ["blocks.0", "head"]
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
