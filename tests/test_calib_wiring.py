"""How calibration feeds its exact steps: which images it reads (`calib.max_images`), that
chunked statistics combine to the whole batch's (`calib.order='fp'`), and which shift the
shift-log2 post-softmax search keeps, at the product's 3 and 4 bits.

Each step is held against I&S-ViT elsewhere (tests/test_quant_reference.py); these checks
fail when the steps are wired together wrongly. The shift search is recomputed here in
numpy from its definition (spdfq_jax/quant/quantizers.py `shift_log2_quant`,
`shift_log2_params`).
"""
import importlib

import flax
import jax
import numpy as np
import pytest

from spdfq_jax import quant
from spdfq_jax.models import taps, zoo
from spdfq_jax.quant import point_stats, qmodel

calib_lib = importlib.import_module("spdfq_jax.quant.calibrate")  # the module, not the function

IMG = 16


def _tiny(noise):
  module = zoo.custom_vit(img_size=IMG, patch_size=2, width=16, depth=2, num_heads=2,
                          num_classes=10)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, IMG, IMG, 3), np.float32))
  rng = np.random.RandomState(3)
  # Non-trivial LayerNorm affine and biases; the larger the noise, the more peaked the
  # attention (larger q/k weights).
  return module, jax.tree_util.tree_map(
      lambda v: np.asarray(v) + noise * rng.randn(*v.shape).astype(np.float32),
      params["params"])


@pytest.fixture(scope="module")
def model():
  return _tiny(0.3)


def _images(n, seed=0):
  return np.random.RandomState(seed).randn(n, IMG, IMG, 3).astype(np.float32)


def _flat(tree):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def _max_rel_diff(a, b):
  """Largest relative difference between two states with the same keys."""
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(b[k]), 1e-12))) for k in a)


# --- 1. only the first calib.max_images images ------------------------------------------

@pytest.mark.parametrize("order", ["sequential", "fp"])
@pytest.mark.parametrize("bits", [3, 4])
def test_calibration_reads_only_the_first_max_images(model, bits, order):
  """With more images than `calib.max_images`, the extra ones (here 1000x larger and
  offset) change nothing: the state is the one of the first `max_images` alone. With
  `max_images` covering them all they do change it, so the comparison is not vacuous.
  The default methods (percentile pairs, I&S-ViT's log2 search) read the whole tensor at
  once, so both orders take the first `max_images`."""
  module, params = model
  keep = 6
  normal = _images(keep)
  wild = 1000.0 * _images(3, seed=1) + 300.0
  images = np.concatenate([normal, wild])
  cfg = quant.default_config(bits, bits, calib_order=order, **{"calib.max_images": keep})
  got = _flat(quant.calibrate(module, params, images, cfg))
  first = _flat(quant.calibrate(module, params, normal, cfg))
  assert got.keys() == first.keys() and got
  for k in got:
    np.testing.assert_array_equal(got[k], first[k], err_msg=k)
  every = quant.default_config(bits, bits, calib_order=order,
                               **{"calib.max_images": len(images)})
  everything = _flat(quant.calibrate(module, params, images, every))
  # Read, the wild images move most ranges (not all: a LayerNorm output barely changes).
  changed = [k for k in got if k.endswith("/scale")
             and not np.allclose(got[k], everything[k], rtol=1e-3)]
  assert len(changed) >= len([k for k in got if k.endswith("/scale")]) // 2, changed


# --- 2. chunked calibration equals one chunk ---------------------------------------------

def _counting(monkeypatch, name):
  calls = []
  original = getattr(calib_lib, name)

  def wrapped(*args):
    calls.append(args[-1].shape[0])
    return original(*args)

  monkeypatch.setattr(calib_lib, name, wrapped)
  return calls


@pytest.mark.parametrize("bits,method", [(3, "percentile"), (4, "percentile"), (3, "mse"),
                                         (4, "mse")])
def test_chunked_calibration_equals_one_chunk(model, monkeypatch, bits, method):
  """calib.order='fp' with methods that need the second pass (histogram percentiles, MSE
  over clipping ratios, the shift-log2 shift search): 3 chunks of 3 images give the state
  of one chunk of 9. The counters prove both passes ran once per chunk; a state from the
  first two chunks only differs, so every chunk counts."""
  module, params = model
  # Chunks that differ: each image at its own scale, the largest in the last chunk.
  images = _images(9) * np.linspace(0.5, 3.0, 9, dtype=np.float32)[:, None, None, None]
  cfg = quant.default_config(bits, bits, preset="reparam", calib_order="fp", a_method=method,
                             percentile=99.0, softmax_quantizer="shift_log2")
  pass1, pass2 = _counting(monkeypatch, "_pass1"), _counting(monkeypatch, "_pass2")
  chunked = _flat(quant.calibrate(module, params, images, cfg, chunk_size=3))
  assert pass1 == [3, 3, 3] and pass2 == [3, 3, 3]
  del pass1[:], pass2[:]
  whole = _flat(quant.calibrate(module, params, images, cfg, chunk_size=9))
  assert pass1 == [9] and pass2 == [9]
  # Every point went the chunked route: per-channel post-LN ranges, a searched shift.
  assert all(whole[k].ndim == 1 for k in whole if k.endswith("qkv_in/scale"))
  assert {k for k in whole if k.endswith("softmax/shift")} == {
      "blocks_0/attn/softmax/shift", "blocks_1/attn/softmax/shift"}
  assert chunked.keys() == whole.keys()
  for k in whole:
    np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=k)
  partial = _flat(quant.calibrate(module, params, images[:6], cfg, chunk_size=3))
  assert _max_rel_diff(partial, whole) > 1e-2


# --- 4. the shift the shift-log2 search keeps --------------------------------------------

SHIFTS = 2.0 ** -np.arange(2, 13)  # the searched shifts: 1/4, 1/8, ..., 1/4096


def _shift_log2_errors(x, bits):
  """Sum of squared errors of the shift-log2 quantizer of x at each shift in SHIFTS, from
  its definition: t = -log2(x + shift) on a uniform grid of 2^b - 1 steps over the range
  of t on [min x, max x], zero point round(-t_min / step), codes clipped to 0..2^b - 1,
  dequantized max(2^-((q - zero) * step) - shift, 0)."""
  x = np.asarray(x, np.float64)
  lo, hi = x.min(), x.max()
  qmax = 2 ** bits - 1
  errs = []
  for shift in SHIFTS:
    t_lo, t_hi = -np.log2(hi + shift), -np.log2(lo + shift)
    step = (t_hi - t_lo) / qmax
    zero = np.round(-t_lo / step)
    q = np.clip(np.round(-np.log2(x + shift) / step) + zero, 0, qmax)
    xq = np.maximum(2.0 ** (-(q - zero) * step) - shift, 0.0)
    errs.append(np.sum((x - xq) ** 2))
  return np.asarray(errs)


def _check_shift(state, point, x, bits):
  errs = _shift_log2_errors(x, bits)
  best = int(np.argmin(errs))
  # The data must make the choice clear: the runner-up is worse by more than float noise.
  runner_up = np.min(np.delete(errs, best))
  assert runner_up > errs[best] * (1 + 1e-3), (point, errs)
  shift = float(state[point + "/shift"])
  assert shift == pytest.approx(SHIFTS[best], rel=1e-7), (point, bits, shift, errs)
  # The kept grid is the one of that shift over the range of x.
  t_lo, t_hi = -np.log2(x.max() + SHIFTS[best]), -np.log2(x.min() + SHIFTS[best])
  step = (t_hi - t_lo) / (2 ** bits - 1)
  np.testing.assert_allclose(state[point + "/scale"], step, rtol=1e-5)
  assert float(state[point + "/zero"]) == np.round(-t_lo / step)
  return best


@pytest.mark.parametrize("bits", [3, 4])
def test_shift_log2_keeps_the_smallest_error_shift(model, bits):
  """shift=None: calibration keeps the shift with the smallest squared error, computed here
  from the quantizer's definition on the attention each softmax point saw.

  order 'fp': the FP model's attention over all images (its own forward, no quantization).
  order 'sequential': the attention the calibration forward itself produced, upstream
  already quantized (read back from that forward's sown intermediates)."""
  module, params = model
  # The candidate list itself (a list shifted by one step keeps the same pick whenever the
  # minimum lies inside both lists, so the data-driven checks below cannot see it).
  np.testing.assert_array_equal(point_stats.SHIFT_CANDIDATES, SHIFTS)
  images = _images(8)
  chosen = []
  cfg = quant.default_config(bits, bits, calib_order="fp", softmax_quantizer="shift_log2")
  assert cfg.softmax.shift is None and cfg.softmax.bits is None  # searched, at the act bits
  state = _flat(quant.calibrate(module, params, images, cfg, chunk_size=4))
  _, attns, _ = taps.apply_with_attention(module, {"params": params}, images)
  for l, attn in enumerate(attns):
    chosen.append(_check_shift(state, f"blocks_{l}/attn/softmax", np.asarray(attn), bits))

  cfg = quant.default_config(bits, bits, softmax_quantizer="shift_log2")  # sequential
  state = _flat(quant.calibrate(module, params, images, cfg))
  init = qmodel.quant_module(module, cfg, "init")
  _, seen = init.apply({"params": params}, images, mutable=["quant", "intermediates"])
  np.testing.assert_array_equal(_flat(seen["quant"])["blocks_1/attn/softmax/shift"],
                                state["blocks_1/attn/softmax/shift"])
  for l in range(2):
    attn = np.asarray(seen["intermediates"][f"blocks_{l}"]["attn"]["attn"][0])
    chosen.append(_check_shift(state, f"blocks_{l}/attn/softmax", attn, bits))
  # Minima inside the candidate list: neither end decides.
  assert all(0 < i < len(SHIFTS) - 1 for i in chosen), chosen


@pytest.mark.parametrize("bits", [3, 4])
def test_shift_log2_search_keeps_the_largest_shift_when_best(bits):
  """Peaked attention (near 0 or near 1): the largest candidate, 1/4, has the smallest
  error; the search must keep it (a candidate list shifted by one keeps 1/2 or 1/8)."""
  module, params = _tiny(1.0)
  images = _images(8)
  cfg = quant.default_config(bits, bits, calib_order="fp", softmax_quantizer="shift_log2")
  state = _flat(quant.calibrate(module, params, images, cfg))
  _, attns, _ = taps.apply_with_attention(module, {"params": params}, images)
  for l, attn in enumerate(attns):
    assert _check_shift(state, f"blocks_{l}/attn/softmax", np.asarray(attn), bits) == 0
