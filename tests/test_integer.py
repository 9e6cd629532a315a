"""Integer inference (`quant.integer`) against the fake-quant model it must reproduce.

The oracle is the fake-quant model run op by op (`module.apply`, not compiled): the
compiled fake-quant model itself moves a few codes across rounding boundaries (XLA fuses
and reorders its float sums), so two float evaluations agree only to that. Calibration
images are noise; the models are the timm parity fixtures (tiny ViT, DeiT-distilled, Swin).
"""
import os

import flax
import jax
import numpy as np
import pytest

from spdfq_jax import models, quant
from spdfq_jax.quant import export, integer, integer_model
from tests import parity_util

BITS = (8, 6, 4, 3)


@pytest.fixture(scope="module", params=[
    "vit", "deit_distilled", pytest.param("swin", marks=pytest.mark.slow)])
def fixture(request):
  module, path, ref = parity_util.fixture(request.param)
  module, params = models.load(module, path)
  rng = np.random.RandomState(0)
  shape = ref["images"].shape[1:]
  calib = rng.randn(8, *shape).astype(np.float32)
  test = np.concatenate([ref["images"], rng.randn(6, *shape).astype(np.float32)])
  return request.param, module, params, calib, test


def _quantized(module, params, calib, bits, **overrides):
  # minmax weights: the clipping search changes scales only, not the integer path.
  cfg = quant.default_config(bits, bits, preset="reparam", w_method="minmax", **overrides)
  return quant.quantize(module, params, calib, cfg, progress=False)


def _agree(int_logits, fq_logits) -> float:
  """The median over images of max |difference| / max |logit|, after checking that every
  top-1 agrees and that half the images agree to float rounding (2e-5): a code whose
  float input sits on a rounding boundary may round the other way in either model, which
  moves that image's logits by a quantization step, not by rounding (the more points and
  the finer the grid, the likelier: Swin at 8 bits)."""
  a, b = np.asarray(int_logits, np.float64), np.asarray(fq_logits, np.float64)
  np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
  per_image = np.abs(a - b).max(-1) / np.abs(b).max()
  assert np.mean(per_image <= 2e-5) >= 0.5, per_image
  return float(np.median(per_image))


def test_integer_model_equals_fake_quant(fixture, tmp_path):
  """The ViT at each bit setting op by op; W4A4 compiled, from its export file. DeiT
  (distillation head) and Swin (windows, patch merging) at W4A4 only: the bit width changes
  the codes, not the layers' integer path."""
  name, module, params, calib, test = fixture
  for bits in BITS if name == "vit" else (4,):
    qm = _quantized(module, params, calib, bits)
    fq = qm.module.apply(qm.variables, test)
    if bits == 4:
      path = os.path.join(tmp_path, "q.safetensors")
      export.save(path, qm)
      im = integer_model.load(path)
      _check_integer_kernels(qm, im, bits)
      logits = im.logits(test)
    else:
      im = integer_model.from_quantized(qm)
      logits = im.module.apply(im.variables, test)
    err = _agree(logits, fq)
    assert err <= 2e-6, (name, bits, err)


def _check_integer_kernels(qm, im, bits):
  """No float copy of a quantized kernel; codes one per byte, or two for <= 4 bits."""
  kernels = {k[:-len("/scale")] for k in flax.traverse_util.flatten_dict(
      qm.variables["wquant"], sep="/") if k.endswith("/scale")}
  float_params = flax.traverse_util.flatten_dict(im.variables["params"], sep="/")
  assert not kernels & set(float_params)
  ints = flax.traverse_util.flatten_dict(im.variables[integer.INT_KERNELS], sep="/")
  codes = [v for k, v in ints.items() if k.endswith(("/codes", "/packed"))]
  assert len(codes) == len(kernels)
  assert all(v.dtype == (np.uint8 if bits <= 4 else np.int8) for v in codes)
  weights = {k: v for k, v in flax.traverse_util.flatten_dict(
      qm.variables["params"], sep="/").items() if k in kernels}
  padded = sum(np.size(v) + np.size(v) // np.shape(v)[-1] for v in weights.values())
  assert sum(np.size(v) for v in codes) <= padded // (2 if bits <= 4 else 1)


@pytest.mark.parametrize("option", [{"softmax_quantizer": "log2"},
                                    {"softmax_quantizer": "uniform"},
                                    {"reparam_round_zero": True}])
def test_other_quantizer_options(fixture, option):
  """The defaults run I&S-ViT's 2^e - shift softmax levels and its non-integer folded zero
  point (the test above); the other softmax quantizers and a rounded zero point too."""
  name, module, params, calib, test = fixture
  if name != "vit":
    pytest.skip("one family is enough for the quantizer options")
  for bits in (8, 4):
    qm = _quantized(module, params, calib, bits, **option)
    im = integer_model.from_quantized(qm)
    err = _agree(im.module.apply(im.variables, test), qm.module.apply(qm.variables, test))
    assert err <= 2e-6, (option, bits, err)


def test_log_codes_sum_to_levels():
  """The int8 chunks of log-domain probabilities dequantize to every level exactly."""
  for step, bits in ((1.0, 4), (0.5, 4), (0.5, 3), (1.0, 3), (0.5, 6)):
    levels = 2 ** bits
    e = np.arange(levels + 2, dtype=np.int32)
    codes = integer.LogCodes(np.minimum(e, levels - 1), e < levels, np.float32(0.5), step,
                             levels)
    total = sum(c.dequantize() for c in codes.chunks())
    want = np.where(e < levels, 0.5 * 2.0 ** (-step * np.minimum(e, levels - 1)), 0.0)
    np.testing.assert_allclose(total, want, rtol=1e-6, atol=0)


def test_shifted_log_codes_sum_to_levels():
  """I&S-ViT's levels 2^e - shift as int8 chunks of 2^-f (f = top - e) and the offset:
  summed against integer codes they give the float einsum of the levels exactly."""
  e = np.arange(-12, 2)
  top, shift = 1, np.float32(0.005)
  codes = integer.LogCodes(np.int32(top - e), np.full(e.shape, True), np.float32(2.0 ** top),
                           1.0, integer.MAX_EXPONENT + 1, shift)
  np.testing.assert_array_equal(codes.dequantize(), (2.0 ** e - shift).astype(np.float32))
  v = integer.IntCodes(np.arange(-7, 7, dtype=np.int8).reshape(14, 1), np.int32(3),
                       np.float32(0.25))
  got = codes.einsum("k,kd->d", v, lhs=True)
  want = (2.0 ** e - np.float64(shift)) @ ((np.arange(-7, 7) - 3) * 0.25)
  np.testing.assert_allclose(np.asarray(got), [want], rtol=1e-6)


def test_unsupported_quantizers_are_refused(fixture):
  name, module, params, calib, _ = fixture
  if name != "vit":
    pytest.skip("checked on one family")
  qm = _quantized(module, params, calib, 4, softmax_quantizer="shift_log2")
  assert "shift-log2" in integer_model.unsupported(qm.cfg, qm.variables["quant"])
  with pytest.raises(ValueError, match="shift-log2"):
    integer_model.from_quantized(qm)
  cfg = quant.default_config(4, 4, preset="reparam", reparam=False)
  qm = quant.quantize(module, params, calib, cfg, progress=False)
  assert "per channel" in integer_model.unsupported(qm.cfg, qm.variables["quant"])


def test_float32_attention_sums_are_the_integer_sums(fixture, monkeypatch):
  """EXACT_FLOAT32_ATTENTION: the same logits, bit for bit (every partial sum < 2^24)."""
  name, module, params, calib, test = fixture
  if name != "vit":
    pytest.skip("checked on one family")
  im = integer_model.from_quantized(_quantized(module, params, calib, 8))
  want = np.asarray(im.module.apply(im.variables, test))
  monkeypatch.setattr(integer, "EXACT_FLOAT32_ATTENTION", True)
  np.testing.assert_array_equal(np.asarray(im.module.apply(im.variables, test)), want)


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
                    reason="needs the Fashion-MNIST IDX files")
def test_infer_command_evaluates_an_export_on_both_paths(tmp_path, monkeypatch):
  """`python -m spdfq_jax.tools.infer FILE --config=...`'s work: the integer and the
  fake-quant model of one export classify the same test images alike, the sizes are the
  file's and the parameters', and a file that is no export is refused by name."""
  from spdfq_jax.tools import infer  # pylint: disable=g-import-not-at-top
  from configs import fmnist_w4a4  # pylint: disable=g-import-not-at-top
  module, params = models.load("fmnist_vit")
  calib = np.random.RandomState(0).randn(8, 32, 32, 1).astype(np.float32)
  qm = quant.quantize(module, params, calib, quant.default_config(4, 4, preset="reparam"),
                      progress=False)
  path = str(tmp_path / "q.safetensors")
  export.save(path, qm)
  config = fmnist_w4a4.get_config()
  config.unlock()
  config.eval.limit, config.eval.batch_size = 32, 32
  calls = []
  integer_logits = integer_model.IntegerModel.logits
  monkeypatch.setattr(integer_model.IntegerModel, "logits",
                      lambda self, x: calls.append(len(x)) or integer_logits(self, x))
  got = {}
  for p in ("integer", "fake"):
    calls.clear()
    got[p] = infer.run(path, config, p, False, 8, 1)
    assert sum(calls) == (32 if p == "integer" else 0), p  # the path it names ran
  assert got["integer"]["path"] == "integer" and got["integer"]["count"] == 32
  assert abs(got["integer"]["top1"] - got["fake"]["top1"]) <= 100 / 32  # one image at most
  n_params = sum(np.size(v) for v in jax.tree_util.tree_leaves(params))
  assert got["integer"]["fp32_bytes"] == 4 * n_params
  assert got["integer"]["file_bytes"] == os.path.getsize(path)
  assert got["integer"]["integer_weight_bytes"] * 5 < got["integer"]["fp32_bytes"]
  plain = str(tmp_path / "plain.safetensors")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"w": np.zeros(3, np.float32)}, plain)
  with pytest.raises(ValueError, match="not a quantized spdfq_jax export"):
    infer.run(plain, config, "integer", False, 8, 1)
