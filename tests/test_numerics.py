"""Numerical faults: a non-finite reconstruction loss stops the run with where and what to
resume from; degenerate activations (constant, all zero, one value) still quantize."""
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdfq_jax import quant
from spdfq_jax.models import zoo
from spdfq_jax.quant import point_stats
from spdfq_jax.quant import quantizers as Q

recon_lib = importlib.import_module("spdfq_jax.quant.reconstruct")


@pytest.fixture(scope="module")
def tiny():
  module = zoo.custom_vit(img_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                          num_classes=10)
  images = np.random.RandomState(0).randn(4, 16, 16, 3).astype(np.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  return module, params, images


def _poison(monkeypatch, unit, call, what="loss"):
  """Makes step `call` (0-based) of `unit` return a NaN loss, or NaN weights."""
  real, calls = recon_lib._step, {}

  def step(qmod, name, cfg, trainable, *args):
    trainable, opt_state, loss = real(qmod, name, cfg, trainable, *args)
    calls[name] = calls.get(name, -1) + 1
    if name == unit and calls[name] == call:
      if what == "loss":
        loss = loss * jnp.nan
      else:
        trainable = jax.tree_util.tree_map(lambda v: v * jnp.nan, trainable)
    return trainable, opt_state, loss

  monkeypatch.setattr(recon_lib, "_step", step)


def test_nan_loss_names_unit_step_and_last_checkpoint(tiny, tmp_path, monkeypatch):
  module, params, images = tiny
  cfg = quant.default_config(4, 4, recon_iters=3, w_method="minmax",  # fewer compiles
                             recon_stages="final")  # the stage whose workdir is recon/
  _poison(monkeypatch, "blocks.0", call=1)
  with pytest.raises(FloatingPointError) as e:
    quant.quantize(module, params, images, cfg, workdir=str(tmp_path), progress=False)
  msg = str(e.value)
  assert "unit 'blocks.0': the loss is nan at step 2 of 3" in msg
  ckpt = os.path.join(str(tmp_path), "recon", "1")
  assert f"Last good checkpoint: {ckpt} (units embed done)" in msg
  assert "quant.recon.lr (now 4e-05)" in msg
  monkeypatch.undo()  # the fault is gone: a restart resumes from that checkpoint
  qm = quant.quantize(module, params, images, cfg, workdir=str(tmp_path), progress=False)
  assert [e["unit"] for e in qm.info["recon"]] == ["blocks.0", "head"]


def test_nan_weights_after_the_last_step(tiny, monkeypatch):
  module, params, images = tiny
  _poison(monkeypatch, "embed", call=1, what="weights")
  with pytest.raises(FloatingPointError,
                     match=r"unit 'embed': the weights are not finite at step 2 of 2.*"
                           r"Last good checkpoint: none: without a workdir"):
    quant.quantize(module, params, images,
                   quant.default_config(4, 4, recon_iters=2, w_method="minmax"), progress=False)


def test_first_nonfinite():
  assert recon_lib.first_nonfinite(np.array([1.0, 2.0])) is None
  assert recon_lib.first_nonfinite(np.array([1.0, np.inf, np.nan])) == 1


DEGENERATE = {
    "zeros": np.zeros((6, 4), np.float32),
    "constant": np.full((6, 4), 3.0, np.float32),
    "negative": np.full((6, 4), -2.5, np.float32),
    "one value": np.array([[7.0]], np.float32),
    "constant channels": np.tile(np.array([[0.0, 1.5, -4.0, 0.0]], np.float32), (6, 1)),
}


def _valid(scale, zero, bits, symmetric):
  qmin, qmax = Q.qrange(bits, symmetric)
  scale, zero = np.asarray(scale), np.asarray(zero)
  assert np.isfinite(scale).all() and (scale > 0).all()
  assert np.isfinite(zero).all() and (zero == np.round(zero)).all()
  assert ((zero >= qmin) & (zero <= qmax)).all()


@pytest.mark.parametrize("name", DEGENERATE)
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_degenerate_ranges_give_a_valid_quantizer(name, method, symmetric):
  """Constant values are range ends, so they quantize to themselves (0 always does)."""
  x = jnp.asarray(DEGENERATE[name])
  for gran in ("tensor", "channel"):
    s, z = Q.quantize_tensor(x, bits=4, granularity=gran, method=method, symmetric=symmetric)
    _valid(s, z, 4, symmetric)
    xq = np.asarray(Q.fake_quant(x, s, z, 4, symmetric))
    assert np.isfinite(xq).all()
    one_value = gran == "channel" or np.unique(np.asarray(x)).size == 1
    if method != "mse" and not symmetric and one_value:
      np.testing.assert_allclose(xq, np.asarray(x), rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda v: Q.fake_quant(v, s, z, 4, symmetric).sum())(x)
    assert np.isfinite(np.asarray(grad)).all()
  dyn = np.asarray(Q.dynamic_fake_quant(x, 4, symmetric))
  assert np.isfinite(dyn).all()


@pytest.mark.parametrize("name", DEGENERATE)
def test_degenerate_softmax_quantizers(name):
  x = jnp.abs(jnp.asarray(DEGENERATE[name]))
  lo, hi = Q.minmax_range(x, (0, 1))
  for kind in ("log2", "log_sqrt2", "shift_log2"):
    spec = quant.config.PointSpec(kind, 4, shift=0.1 if kind == "shift_log2" else None)
    state = point_stats.finalize(spec, {"lo": lo, "hi": hi})
    assert all(np.isfinite(np.asarray(v)).all() for v in state.values())
    if kind == "shift_log2":
      out = Q.shift_log2_quant(x, state["scale"], state["zero"], state["shift"], 4)
    else:
      out = Q.log2_quant(x, state["scale"], 4, step=1.0 if kind == "log2" else 0.5)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("overrides", [
    {},
    {"acts.method": "percentile", "softmax.quantizer": "shift_log2", "weights.method": "minmax"},
], ids=["minmax-reparam", "percentile-shift_log2"])
def test_all_zero_activations_calibrate_to_finite_state(tiny, overrides):
  """Black images through a model with zero biases, tokens and position table: every
  activation up to the first LayerNorm is zero, the post-LN ones are constant."""
  module, params, _ = tiny
  params = jax.tree_util.tree_map(np.asarray, params)
  for key in ("cls_token", "pos_embed"):
    params[key] = np.zeros_like(params[key])
  params["patch_embed"] = {**params["patch_embed"],
                           "bias": np.zeros_like(params["patch_embed"]["bias"])}
  images = np.zeros((4, 16, 16, 3), np.float32)
  cfg = quant.default_config(4, 4, recon_iters=0, **overrides)
  qm = quant.quantize(module, params, images, cfg, progress=False)
  for path, v in jax.tree_util.tree_leaves_with_path(qm.variables):
    assert np.isfinite(np.asarray(v)).all(), jax.tree_util.keystr(path)
  assert np.isfinite(np.asarray(qm.logits(images))).all()
  assert np.isfinite(np.asarray(qm.logits(np.ones_like(images)))).all()
