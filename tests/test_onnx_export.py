"""The ONNX graph (`deploy.onnx_graph`) in ONNX Runtime against the integer model.

The oracle is `quant.integer` (itself held against the fake-quant model in
test_integer.py), compiled; the models are the timm parity fixtures. Besides the logits,
the graph's structure is checked: every quantized kernel must feed a `MatMulInteger` (a
layer silently written in float would give the same logits) and ONNX Runtime's profile
must show the integer kernels running.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install "
                          "-e '.[onnx]' (./run test installs it)")

import onnx  # noqa: E402

from spdfq_jax import models, quant  # noqa: E402
from spdfq_jax.deploy import onnx_graph, onnx_layers, onnx_runtime  # noqa: E402
from spdfq_jax.quant import export, integer_model  # noqa: E402
from spdfq_jax.tools import export_onnx  # noqa: E402
from tests import parity_util  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_FMNIST = os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def beds():
  out = {}
  for name in parity_util.FIXTURES:
    module, path, ref = parity_util.fixture(name)
    module, params = models.load(module, path)
    rng = np.random.RandomState(0)
    shape = ref["images"].shape[1:]
    calib = rng.randn(8, *shape).astype(np.float32)
    test = np.concatenate([ref["images"], rng.randn(10, *shape).astype(np.float32)])
    out[name] = module, params, calib, test
  return out


def _quantized(bed, bits, **overrides):
  module, params, calib, _ = bed
  cfg = quant.default_config(bits, bits, preset="reparam", **overrides)
  return quant.quantize(module, params, calib, cfg, progress=False)


@pytest.fixture(scope="module")
def w4a4(beds):
  """name -> that fixture model at W4A4 with the default quantizers (made once, when first
  asked for)."""
  made = {}
  def get(name):
    if name not in made:
      made[name] = _quantized(beds[name], 4)
    return made[name]
  return get


def _check(onnx_logits, int_logits):
  """Every top-1 equal; the logits equal to float rounding on at least 90% of the images
  (a code on a rounding boundary may round the other way in either evaluation)."""
  a, b = np.asarray(onnx_logits, np.float64), np.asarray(int_logits, np.float64)
  np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
  per_image = np.abs(a - b).max(-1) / np.abs(b).max()
  assert np.mean(per_image <= 1e-6) >= 0.9, per_image


def _integer_matmuls_per_kernel(model) -> dict:
  """{weight initializer: how many MatMulInteger nodes read it}."""
  weights = {t.name for t in model.graph.initializer}
  count = {}
  for n in model.graph.node:
    if n.op_type == "MatMulInteger" and n.input[1] in weights:
      count[n.input[1]] = count.get(n.input[1], 0) + 1
  return count


@pytest.mark.parametrize("name", parity_util.FIXTURES)
def test_graph_equals_integer_model(beds, w4a4, name, tmp_path):
  """W4A4 with the default quantizers (2^e - shift softmax, reparameterised zero point),
  through the export file and the command; every quantized kernel on MatMulInteger, the
  clipped-entry mask on qkv and fc1."""
  qm = w4a4(name)
  src = os.path.join(tmp_path, "q.safetensors")
  export.save(src, qm)
  dst = os.path.join(tmp_path, "q.onnx")
  export_onnx.export(src, dst)
  test = beds[name][3]
  _check(onnx_runtime.logits(onnx_runtime.session(dst), test), integer_model.load(src).logits(test))
  model = onnx.load(dst)
  parts = integer_model.export_parts(src)
  quantized = [k for k in parts.kernels if "patch_embed" not in k]  # its input stays FP
  assert _integer_matmuls_per_kernel(model) == {
      k: 2 if k.endswith(("qkv/kernel", "fc1/kernel")) else 1 for k in quantized}


def test_options_with_their_own_onnx_form(beds):
  """The ViT at the bit widths and options whose ONNX form differs from the default."""
  test = beds["vit"][3]
  for bits, overrides in [(3, {}), (8, {}), (6, {"softmax_quantizer": "uniform"}),
                          (4, {"softmax_quantizer": "log2"}),
                          (4, {"softmax_quantizer": "log_sqrt2", "reparam_round_zero": True}),
                          (4, {"keep_fp": []}),
                          (4, {"w_method": "minmax", "weights.symmetric": True}),
                          (8, {"w_method": "minmax", "weights.symmetric": True,
                               "a_method": "minmax", "acts.symmetric": True})]:
    qm = _quantized(beds["vit"], bits, **overrides)
    parts = integer_model.quantized_parts(qm)
    model = onnx_graph.build(parts)
    _check(onnx_runtime.logits(onnx_runtime.session(model), test),
           integer_model.build(parts).logits(test))
    if overrides.get("softmax_quantizer") == "uniform":  # attn @ v on integers too
      assert sum(n.op_type == "MatMulInteger" and "attn_v" in n.name
                 for n in model.graph.node) == qm.module.depth


def test_swin_per_channel_reduction_input(beds):
  """Swin's patch-merging input with a zero point per channel (the bias carries it)."""
  qm = _quantized(beds["swin"], 4, **{"acts.reduction_post_ln": True})
  parts = integer_model.quantized_parts(qm)
  test = beds["swin"][3]
  _check(onnx_runtime.logits(onnx_runtime.session(onnx_graph.build(parts)), test),
         integer_model.build(parts).logits(test))


def test_fp_graph_equals_fp_model(beds, w4a4):
  """--fp: the FP32 graph of the dequantized weights against the JAX FP model."""
  for name in ("deit_distilled", "swin"):
    qm = w4a4(name)
    fp = quant.qmodel.quant_module(qm.module, qm.cfg, "fp")
    test = beds[name][3]
    want = np.asarray(fp.apply({"params": qm.variables["params"]}, test))
    got = onnx_runtime.logits(onnx_runtime.session(
        onnx_graph.build(integer_model.quantized_parts(qm), fp=True)), test)
    assert parity_util.rel_err(got, want) < 1e-5
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_integer_kernels_run(beds, w4a4):
  """ONNX Runtime's profile: every quantized matmul (4 layers, 2 masks and the scores per
  block, the head) runs on its fused integer GEMM, MatMulIntegerToFloat."""
  qm = w4a4("vit")
  ran = onnx_runtime.kernels_ran(onnx_graph.build(integer_model.quantized_parts(qm)),
                                 beds["vit"][3][:2])
  assert ran["MatMulIntegerToFloat"]["nodes"] == 7 * qm.module.depth + 1, ran
  assert "MatMulInteger" not in ran, ran  # none left unfused


@pytest.mark.parametrize("bits,dtype,codes,signed", [
    (4, np.int8, (0, 15), False), (7, np.int8, (0, 127), False), (8, np.uint8, (0, 255), False),
    (8, np.int8, (0, 255), True)])
def test_weight_operand(bits, dtype, codes, signed):
  """Codes keep their differences to the zero point; below 8 bits they are int8 centred on
  the grid (|w| <= 64: no int16 pair sum can saturate), at 8 bits uint8."""
  q = np.array([[codes[0], codes[1]], [codes[1], codes[0]]])
  zero = np.array([3, codes[1] - 2])
  w, wz = onnx_layers.weight_operand(q, zero, bits, "k", signed)
  assert w.dtype == dtype and wz.dtype == dtype
  np.testing.assert_array_equal(w.astype(int) - wz.astype(int), q - zero)
  if bits <= 7:
    assert np.abs(w.astype(int)).max() <= 64
  with pytest.raises(ValueError, match="do not fit"):
    onnx_layers.weight_operand(q, np.array([codes[1] + 200, 0]), bits, "k", signed)


@pytest.mark.skipif(not HAVE_FMNIST, reason="needs the Fashion-MNIST IDX files (./run installs "
                    "them: apt-get install dataset-fashion-mnist)")
def test_commands(beds, tmp_path):
  """export_onnx and infer as a user runs them: the Fashion-MNIST demo config's data,
  --against the export's integer model; a file that is not an export is refused."""
  module, params = models.load("fmnist_vit")
  from spdfq_jax.data import test_bed  # pylint: disable=g-import-not-at-top
  calib = test_bed("fashion_mnist").calibration_images(8, 0, None, 1)[0]
  qm = quant.quantize(module, params, calib, quant.default_config(4, 4, preset="reparam"),
                      progress=False)
  src, dst = os.path.join(tmp_path, "q.safetensors"), os.path.join(tmp_path, "m.onnx")
  export.save(src, qm)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True,  # noqa: E731
                                  env=env, cwd=ROOT, timeout=600)
  r = run("spdfq_jax.tools.export_onnx", src, "-o", dst)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["ops"]["MatMulInteger"] > 0
  r = run("spdfq_jax.tools.infer", dst, "--config=configs/fmnist_w4a4.py",
          "--config.eval.limit=200", f"--against={src}")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["count"] == 200 and out["top1_agreement_pct"] >= 99.0, out
  r = run("spdfq_jax.tools.export_onnx", os.path.join(ROOT, "tests", "fixtures", "parity",
                                                      "vit.safetensors"), "-o", dst)
  assert r.returncode != 0 and "not a quantized spdfq_jax export" in r.stderr, r.stderr
