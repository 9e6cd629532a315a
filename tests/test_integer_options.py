"""The integer model (`quant.integer`) with the options the default settings leave off:
Swin's patch-merging input folded per channel (`acts.reduction_post_ln=True`, which keeps
an integer zero point per input channel) and symmetric weights (`weights.symmetric=True`,
signed codes with zero point 0), at W4A4 and W3A3, against the fake-quant model's logits
(`QuantizedModel.logits`), directly and from the export file.

Tolerance as tests/test_integer.py: every top-1 agrees, half the images agree to 2e-5 of
the largest logit, the median image to 2e-6 (a code on a rounding boundary may round the
other way in either model)."""
import flax
import jax
import numpy as np
import pytest

from spdfq_jax import quant
from spdfq_jax.models import zoo
from spdfq_jax.quant import export, integer_model

IMG = 16


def _tiny(family):
  if family == "vit":
    return zoo.custom_vit(img_size=IMG, patch_size=4, width=16, depth=2, num_heads=2,
                          num_classes=10)
  # Two stages: one patch merging (norm + bias-free reduction) between them.
  return zoo.custom_swin(img_size=IMG, patch_size=2, embed_dim=16, depths=(2, 1),
                         num_heads=(2, 4), window_size=4, num_classes=10)


def _agree(int_logits, fq_logits) -> float:
  a, b = np.asarray(int_logits, np.float64), np.asarray(fq_logits, np.float64)
  np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
  per_image = np.abs(a - b).max(-1) / np.abs(b).max()
  assert np.mean(per_image <= 2e-5) >= 0.5, per_image
  return float(np.median(per_image))


@pytest.fixture(scope="module", params=["swin", "vit"])
def model(request):
  module = _tiny(request.param)
  rng = np.random.RandomState(1)
  calib = rng.randn(8, IMG, IMG, 3).astype(np.float32)
  test = rng.randn(8, IMG, IMG, 3).astype(np.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), calib[:1])["params"]
  # Non-trivial LayerNorm affine and biases: per-channel ranges that really differ.
  params = jax.tree_util.tree_map(
      lambda v: np.asarray(v) + 0.3 * rng.randn(*v.shape).astype(np.float32), params)
  return request.param, module, params, calib, test


@pytest.mark.parametrize("bits", [4, 3])
def test_integer_model_with_folded_reduction_and_symmetric_weights(model, bits, tmp_path):
  name, module, params, calib, test = model
  options = {"weights.symmetric": True}
  if name == "swin":
    options["acts.reduction_post_ln"] = True
  # Symmetric weights need a symmetric range method (the percentile-pair search is not).
  cfg = quant.default_config(bits, bits, preset="reparam", w_method="minmax", **options)
  qm = quant.quantize(module, params, calib, cfg, progress=False)

  # The options are in effect: signed weight codes with zero point 0, and (Swin) one
  # scale but an integer zero point per channel at the patch-merging input.
  ws = flax.traverse_util.flatten_dict(qm.variables["wquant"], sep="/")
  assert ws and all(np.all(np.asarray(v) == 0) for k, v in ws.items() if k.endswith("/zero"))
  qs = flax.traverse_util.flatten_dict(qm.variables["quant"], sep="/")
  if name == "swin":
    zero = np.asarray(qs["layers_1/downsample/reduction_in/zero"])
    assert np.ndim(qs["layers_1/downsample/reduction_in/scale"]) == 0
    assert zero.ndim == 1 and len(np.unique(zero)) > 1
    np.testing.assert_array_equal(zero, np.round(zero))
  assert integer_model.unsupported(qm.cfg, qm.variables["quant"]) is None

  fq = qm.logits(test)
  err = _agree(integer_model.from_quantized(qm).logits(test), fq)
  assert err <= 2e-6, (name, bits, err)
  path = str(tmp_path / "q.safetensors")
  export.save(path, qm)
  err = _agree(integer_model.load(path).logits(test), fq)
  assert err <= 2e-6, (name, bits, "from the export", err)
