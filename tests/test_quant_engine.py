"""The quantized model, calibration, reparameterisation, reconstruction and export,
on tiny random ViT / Swin models."""
import importlib
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdfq_jax.models import zoo
from spdfq_jax import quant
from spdfq_jax.quant import export, qmodel

recon_lib = importlib.import_module("spdfq_jax.quant.reconstruct")  # the module, not the function

N = 16


def _tiny(family):
  if family == "vit":
    return zoo.custom_vit(img_size=32, patch_size=8, width=48, depth=2, num_heads=3,
                          num_classes=10)
  return zoo.custom_swin(img_size=32, patch_size=4, embed_dim=16, depths=(2, 1),
                         num_heads=(2, 4), window_size=4, num_classes=10)


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).randn(N, 32, 32, 3).astype(np.float32)


@pytest.fixture(scope="module", params=["vit", pytest.param("swin", marks=pytest.mark.slow)])
def model(request, images):
  module = _tiny(request.param)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  # Non-trivial LayerNorm affine and biases, so folding is really exercised.
  rng = np.random.RandomState(1)
  return module, jax.tree_util.tree_map(
      lambda v: np.asarray(v) + 0.1 * rng.randn(*v.shape).astype(np.float32), params)


def test_config_validation():
  with pytest.raises(ValueError, match="2..8"):
    quant.default_config(9, 4)
  with pytest.raises(ValueError, match="2..8"):
    quant.default_config(4, 1)
  with pytest.raises(ValueError, match="unknown"):
    quant.default_config(4, 4, no_such_field=1)
  with pytest.raises(ValueError, match="preset"):
    quant.default_config(4, 4, preset="best")
  c = quant.default_config(3, 3, preset="calib", recon_iters=5, **{"acts.method": "mse"})
  assert (c.recon.iters, c.acts.method, c.reparam, c.acts.post_ln_granularity) == (
      5, "mse", False, "tensor")
  full = quant.default_config()  # I&S-ViT's stage with the paper's 100 iterations
  assert full.reparam and full.recon.iters == 100 and full.keep_fp == ["patch_in"]
  assert (full.recon.stages, full.recon.train, full.recon.loss, full.recon.batch_size) == (
      "both", "no_norm", "sum_dim1", 64)
  assert (full.acts.method, full.weights.method, full.softmax.quantizer, full.calib.order) == (
      "percentile_mse", "percentile_mse", "ias_log2", "sequential")


def test_fp_point_bit_identical(model, images):
  module, params = model
  fp = module.apply({"params": params}, images)
  q = qmodel.quant_module(module, quant.default_config(4, 4), mode="fp")
  out, state = q.apply({"params": params}, images, mutable=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(fp))
  assert set(state) <= {"params", "intermediates"}  # no quantizer state, nothing renamed


def test_weight_transform_keeps_names(images):
  module = _tiny("vit")
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  cfg = quant.default_config(4, 4, keep_fp=["head*"])
  ws = quant.weight_state(params, cfg)
  qp = quant.quantize_weights(params, ws, cfg)
  assert jax.tree_util.tree_structure(qp) == jax.tree_util.tree_structure(
      flax.core.unfreeze(params))
  flat_w = flax.traverse_util.flatten_dict(ws, sep="/")
  kernels = [k for k in flax.traverse_util.flatten_dict(params, sep="/") if k.endswith("kernel")]
  assert {k.rsplit("/", 1)[0] for k in flat_w} == {k for k in kernels if not k.startswith("head")}
  emb = [k for k in flat_w if k.startswith("patch_embed")]
  assert emb, "the conv patch embedding is quantized too"
  # per output channel: one scale per last-axis entry; at most 16 levels per channel
  k = "blocks_0/mlp/fc1/kernel"
  w = flax.traverse_util.flatten_dict(qp, sep="/")[k]
  assert flat_w[k + "/scale"].shape == (w.shape[-1],)
  assert max(len(np.unique(np.asarray(w[:, j]))) for j in range(w.shape[-1])) <= 16
  again = quant.quantize_weights(qp, ws, cfg)  # idempotent
  np.testing.assert_array_equal(np.asarray(again["head"]["kernel"]), params["head"]["kernel"])


def test_calibration_independent_of_chunking(images):
  module = _tiny("vit")
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  cfg = quant.default_config(4, 4, preset="reparam", a_method="percentile",
                             percentile=99.0, softmax_quantizer="shift_log2")
  a = quant.calibrate(module, params, images, cfg, chunk_size=N)
  b = quant.calibrate(module, params, images, cfg, chunk_size=N // 2)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  fa = flax.traverse_util.flatten_dict(a, sep="/")
  post_ln = [k for k in fa if k.endswith("qkv_in/scale")]
  assert post_ln and all(fa[k].ndim == 1 for k in post_ln)  # per channel before reparam
  assert all(fa[k].ndim == 0 for k in fa if k.endswith("proj_in/scale"))


def test_reparam_preserves_fp_function(model, images):
  module, params = model
  # Rounded folded zero points make the folded model equal the per-channel one (I&S-ViT's
  # unrounded mean does not, tests/test_quant_reference.py); the Swin reduction folded too.
  cfg = quant.default_config(4, 4, preset="reparam", keep_fp=["*kernel"], reparam_round_zero=True,
                             **{"acts.reduction_post_ln": True})
  qs = quant.calibrate(module, params, images, cfg)
  p2, qs2 = quant.reparameterize(params, qs, cfg)
  fp = module.apply({"params": params}, images)
  fp2 = module.apply({"params": p2}, images)
  assert float(jnp.max(jnp.abs(fp - fp2)) / jnp.max(jnp.abs(fp))) <= 1e-5
  flat = flax.traverse_util.flatten_dict(qs2, sep="/")
  # Every deployed scale is per tensor; only the bias-free Swin reduction keeps per-channel
  # integer zero points (free in an integer kernel).
  assert all(v.ndim == 0 for k, v in flat.items() if k.endswith("/scale"))
  per_channel_zero = sorted(k for k, v in flat.items() if k.endswith("/zero") and v.ndim)
  assert all(k.endswith("reduction_in/zero") for k in per_channel_zero)
  assert bool(per_channel_zero) == isinstance(module, zoo.SwinTransformer)
  # The folded per-tensor model computes the per-channel quantized model.
  qm = qmodel.quant_module(module, cfg)
  a = qm.apply({"params": params, "quant": qs}, images)
  b = qm.apply({"params": p2, "quant": qs2}, images)
  assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) <= 1e-4


def test_reconstruction_improves_resumes_and_exports_int4(tmp_path, images, monkeypatch):
  module = zoo.custom_vit(img_size=32, patch_size=8, width=32, depth=1, num_heads=2,
                          num_classes=10)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  cfg = quant.default_config(4, 4, recon_iters=8, recon_lr=1e-4, recon_batch_size=N)
  qs = quant.calibrate(module, params, images, cfg)
  params, qs = quant.reparameterize(params, qs, cfg)
  ws = quant.weight_state(params, cfg)
  full, log = quant.reconstruct(module, params, qs, ws, images, cfg, progress=False)
  assert [e["unit"] for e in log] == ["embed", "blocks.0", "head"]
  assert all(e["loss_last"] < e["loss_first"] for e in log), log
  fp = module.apply({"params": params}, images)
  qm = quant.build(module, full, qs, ws, cfg)
  err = lambda p: float(jnp.mean((qm.logits(images, dict(qm.variables, params=p)) - fp) ** 2))
  # Greedy per-unit training on a random model need not lower the end-to-end error; it must
  # not blow it up (the accuracy gain is measured on trained models, BENCHMARKS.md).
  before = err(quant.quantize_weights(params, ws, cfg))
  assert err(quant.quantize_weights(full, ws, cfg)) < 1.25 * before
  # Interrupted after the first unit, then resumed from the workdir: same result.
  calls = []
  train = recon_lib._train_unit
  def flaky(*args, **kw):
    calls.append(args[1])
    if len(calls) == 2:
      raise KeyboardInterrupt
    return train(*args, **kw)
  monkeypatch.setattr(recon_lib, "_train_unit", flaky)
  with pytest.raises(KeyboardInterrupt):
    quant.reconstruct(module, params, qs, ws, images, cfg, workdir=str(tmp_path), progress=False)
  monkeypatch.setattr(recon_lib, "_train_unit", train)
  resumed, log2 = quant.reconstruct(module, params, qs, ws, images, cfg, workdir=str(tmp_path),
                                    progress=False)
  assert [e["unit"] for e in log2] == ["blocks.0", "head"]
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # int4 export (two per byte) loads back into the same fake-quant model.
  path = os.path.join(tmp_path, "w4.safetensors")
  size = export.save(path, qm)
  assert size["ratio"] > 4.0 and size["file_bytes"] < size["fp32_bytes"] / 3
  np.testing.assert_array_equal(np.asarray(export.load(path).logits(images)),
                                np.asarray(qm.logits(images)))


def test_reconstruction_kernels_only_trains_only_kernels(images):
  """recon.train='kernels' moves every kernel and nothing else (class token, position
  table, biases and LayerNorm stay), including units whose path is itself a leaf."""
  module = zoo.custom_vit(img_size=32, patch_size=8, width=32, depth=1, num_heads=2,
                          num_classes=10)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  cfg = quant.default_config(4, 4, preset="calib", recon_iters=3, recon_lr=1e-2,
                             recon_batch_size=N, recon_train="kernels")
  qs = quant.calibrate(module, params, images, cfg)
  ws = quant.weight_state(params, cfg)
  out, _ = quant.reconstruct(module, params, qs, ws, images, cfg, progress=False)
  before = flax.traverse_util.flatten_dict(params, sep="/")
  after = flax.traverse_util.flatten_dict(out, sep="/")
  assert any(k.count("/") == 0 for k in before)  # a top-level leaf (cls / pos_embed) exists
  for k, v in before.items():
    moved = not np.array_equal(np.asarray(v), np.asarray(after[k]))
    assert moved == k.endswith("kernel"), k


def test_quantize_export_int8_and_integer_dense(tmp_path, images):
  module = _tiny("vit")
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  cfg = quant.default_config(8, 8, preset="reparam", softmax_quantizer="shift_log2")
  qm = quant.quantize(module, params, images, cfg, progress=False)
  assert isinstance(qm, quant.QuantizedModel)
  fp = module.apply({"params": params}, images)
  logits = qm.logits(images)
  assert float(jnp.mean((logits - fp) ** 2) / jnp.mean(fp ** 2)) < 1e-2
  np.testing.assert_array_equal(np.asarray(qm.module.apply(qm.variables, images)),
                                np.asarray(logits))
  path = os.path.join(tmp_path, "w8.safetensors")
  size = export.save(path, qm)
  assert size["ratio"] > 3.0 and size["file_bytes"] < size["fp32_bytes"] / 2.5
  np.testing.assert_array_equal(np.asarray(export.load(path).logits(images)), np.asarray(logits))
  # Integer path of a real layer (fc2: per-tensor input, per-channel kernel).
  v = flax.traverse_util.flatten_dict(qm.variables, sep="/")
  pre = "blocks_0/mlp/"
  s_a, z_a = v[("quant/" + pre + "fc2_in/scale")], v["quant/" + pre + "fc2_in/zero"]
  s_w, z_w = v["wquant/" + pre + "fc2/kernel/scale"], v["wquant/" + pre + "fc2/kernel/zero"]
  kernel, bias = v["params/" + pre + "fc2/kernel"], v["params/" + pre + "fc2/bias"]
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 5, kernel.shape[0])) * float(s_a) * 40
  w_int = quant.quantizers.to_int(kernel, s_w, z_w, 8).astype(jnp.uint8)
  y_int = export.int_dense(x, s_a, z_a, 8, w_int, s_w, z_w, 8, bias)
  y_fake = quant.quantizers.fake_quant(x, s_a, z_a, 8) @ kernel + bias
  np.testing.assert_allclose(y_int, y_fake, rtol=1e-4, atol=1e-4 * float(jnp.abs(y_fake).max()))


@pytest.mark.parametrize("stages", ["both", "final"])
def test_quantize_runs_the_reference_stages(images, monkeypatch, stages):
  """I&S-ViT's order: reconstruction with FP weights on FP inputs before the
  reparameterisation, then with quantized weights on quantized inputs; both against the FP
  model given ('final': only the second)."""
  module = zoo.custom_vit(img_size=32, patch_size=8, width=32, depth=1, num_heads=2,
                          num_classes=10)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  calls = []
  def fake(module, p, qs, ws, images, cfg, workdir=None, progress=True, teacher=None,
           fp_inputs=False, draws=None):
    assert draws is None  # batches are drawn from recon.seed unless a replay is given
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(teacher),
                                                   jax.tree_util.tree_leaves(params)))
    calls.append((fp_inputs, bool(ws), same, any(
        np.ndim(v) == 1 for k, v in flax.traverse_util.flatten_dict(qs, sep="/").items()
        if k.endswith("qkv_in/scale"))))
    return p, []
  api = importlib.import_module("spdfq_jax.quant.api")
  monkeypatch.setattr(api, "reconstruct", fake)
  overrides = {} if stages == "both" else {"recon_stages": stages}  # 'both' is the default
  quant.quantize(module, params, images, quant.default_config(4, 4, recon_iters=1, **overrides))
  # (FP inputs, weights quantized, teacher = the FP params, per-channel post-LN state)
  want = [(False, True, True, False)]
  if stages == "both":
    want = [(True, False, True, True)] + want
  assert calls == want
