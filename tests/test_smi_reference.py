"""SMI against the reference code's own numbers (no torch needed).

tests/fixtures/make_smi_reference.py ran Egg-Hu/SMI's `SMI.synthesize` (teacher from its
`build_model`) on a tiny timm ViT (7 x 7 patches) for 12 steps, pruning 30% of the kept
patches at steps 3, 6 and 9, and recorded its draws, per-step losses, the token indices each
forward kept, the last iterate, the final mask's ranking and the calibration images its data
pool gives back. Here the same draws are replayed through this package's SMI.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import parity_util

from spdfq_jax import models, parallel, synth
from spdfq_jax.models import zoo
from spdfq_jax.synth import layout as layout_lib
from spdfq_jax.synth import smi

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "smi_reference")


@pytest.fixture(scope="module")
def case():
  with np.load(os.path.join(DIR, "vit.npz"), allow_pickle=False) as f:
    ref = dict(f)
  kwargs = json.loads(str(ref["arch"]))["kwargs"]
  module, params = models.load(zoo.custom_vit(**kwargs), os.path.join(DIR, "vit.safetensors"))
  cfg = synth.default_config("smi")
  b = ref["images0"].shape[0]
  cfg.update(num_images=b, mean=tuple(ref["mean"].tolist()), std=tuple(ref["std"].tolist()),
             iterations=int(ref["iterations"]), smi_prune_at=tuple(ref["prune_at"].tolist()),
             smi_prune_ratio=tuple(ref["prune_ratio"].tolist()), log_every=4)
  info = layout_lib.model_info(module, params, cfg)
  targets = np.eye(info.num_classes, dtype=np.float32)[ref["targets"]]
  return module, params, cfg, info, targets, ref


def _replay(cfg: ml_collections.ConfigDict, info, ref) -> smi.SmiPlan:
  """The package's plan (kinds and token counts) with the reference's recorded draws."""
  plan = smi.make_plan(cfg, info)
  return smi.SmiPlan(plan.kinds, plan.tokens, plan.keep_after,
                     ref["shift_h"].astype(np.int32), ref["shift_w"].astype(np.int32),
                     ref["flip"].astype(bool), plan.final_keep)


def test_fixture_names_the_reference_commit(case):
  *_, ref = case
  assert str(ref["reference_commit"]).startswith("a5fec4d") and len(str(ref["reference_commit"])) == 40


def test_defaults_are_test_quant_settings(case):
  _, _, cfg, *_ , ref = case
  d = synth.default_config("smi")
  assert (d.iterations, d.lr, d.b1, d.b2, d.tv_weight, d.tv_mode) == (4000, 0.25, 0.5, 0.99,
                                                                     1e-4, "min")
  assert d.lr == float(ref["lr"]) and d.b2 == float(ref["b2"])
  assert d.tv_weight == pytest.approx(float(ref["tv_weight"]))
  assert not (d.apa or d.msr or d.sl or d.entropy)
  assert d.smi_jitter == 0.125  # lim = 1/8 of the side per axis: 28 px at 224
  assert np.abs(ref["shift_h"]).max() <= 28 and np.abs(ref["shift_w"]).max() <= 28


def test_plan_kinds_and_token_counts_equal_reference(case):
  """Which steps jitter, and how many tokens each step's forward keeps (49 -> 34 -> 23 -> 16)."""
  _, _, cfg, info, _, ref = case
  plan = smi.make_plan(cfg, info)
  np.testing.assert_array_equal(np.array([k == smi.JIT for k in plan.kinds]), ref["jittered"])
  counts = (ref["index"] >= 0).sum(-1)[:, 0] - 1  # patch tokens per step
  np.testing.assert_array_equal(plan.tokens, counts)
  assert plan.final_keep == ref["final_top"].shape[1] == ref["calib_index"].shape[1] == 17


@pytest.mark.slow
def test_each_step_keeps_the_reference_tokens(case):
  """Step by step from the reference's start: the token indices each forward uses (after
  the jitter's remap, and after each ranking) equal the reference's, and each step's CE and
  TV equal its values."""
  module, params, cfg, info, targets, ref = case
  plan = _replay(cfg, info, ref)
  mesh = parallel.data_mesh()
  step = smi.make_step(module, cfg, info, mesh)
  x = jnp.asarray(ref["images0"])
  import optax
  opt = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps).init(x)
  keep = jnp.asarray(smi.full_keep(len(x), info))
  fixed = {"mask": jnp.ones(len(x)), "targets": jnp.asarray(targets)}
  grid, patch = info.grid[0], info.image_shape[0] // info.grid[0]
  for t, kind in enumerate(plan.kinds):
    row = {"shift_h": plan.shift_h[t], "shift_w": plan.shift_w[t], "flip": plan.flip[t]}
    used = keep
    if kind == smi.JIT and plan.tokens[t] < grid * grid:
      used = smi.jitter_keep(keep, row["shift_h"], row["shift_w"], row["flip"], grid, patch,
                             info.prefix)
    want = ref["index"][t][:, :used.shape[1]]
    np.testing.assert_array_equal(np.asarray(used), want, err_msg=f"step {t}")
    assert (ref["index"][t][:, used.shape[1]:] == -1).all()
    x, opt, keep, terms = step(params, x, opt, keep, fixed, jax.device_put(row), kind=kind,
                               remap=plan.tokens[t] < grid * grid,
                               k_next=plan.keep_after[t] if kind == smi.PRE else None)
    np.testing.assert_allclose(float(terms["ce"]), ref["ce"][t], rtol=2e-4, err_msg=f"{t}")
    np.testing.assert_allclose(float(terms["tv"]), 1e-4 * ref["tv"][t], rtol=1e-5)
    np.testing.assert_allclose(float(terms["ce"] + terms["tv"]), ref["total"][t], rtol=2e-4)


def test_invert_returns_the_reference_last_iterate(case):
  """The whole loop (the reference keeps its last iterate, not its best): same images."""
  module, params, cfg, info, targets, ref = case
  seen = []
  last = smi.invert(module, params, cfg, info, ref["images0"], targets, _replay(cfg, info, ref),
                    progress=False, callback=lambda s, v: seen.append(v["ce"]))
  np.testing.assert_allclose(seen, ref["ce"], rtol=2e-4)
  x0 = ref["images0"]
  assert parity_util.cosine(last - x0, ref["last"] - x0) >= 0.99999
  # Adam divides by the root of the squared gradients' average, so float32's last bits in a
  # gradient move a pixel by up to ~1e-2 after 12 steps (measured: 4% of pixels by more
  # than 1e-4); on average the images agree to 4e-5 of how far they moved.
  err, moved = np.abs(last - ref["last"]), np.abs(ref["last"] - x0)
  assert err.mean() < 1e-4 * moved.mean() and err.max() < 0.02, (err.mean(), err.max())


def test_final_mask_and_calibration_images_equal_reference(case):
  """From the reference's last iterate: the final ranking (on the de-normalised pixels, at
  full tokens), the masked 8-bit images read back with zeros kept, and the non-zero patches
  calibration keeps."""
  module, params, cfg, info, _, ref = case
  images, kept = smi.final_mask(module, params, cfg, info, ref["last"],
                                smi.make_plan(cfg, info).final_keep)
  np.testing.assert_array_equal(kept + 1, np.sort(ref["final_top"], axis=1))
  np.testing.assert_array_equal(kept + 1, ref["calib_index"])
  diff = np.abs(images - ref["calib"])
  # One 8-bit level is 1/255/std ~ 0.017; truncation may flip a level where the pixel sits
  # on a level boundary to float32 rounding.
  assert np.mean(diff > 1e-5) < 1e-4 and diff.max() < 0.02, (np.mean(diff > 1e-5), diff.max())
  np.testing.assert_array_equal(images == 0, ref["calib"] == 0)
  patch = info.image_shape[0] // info.grid[0]
  got = smi.nonzero_patches(images, patch)
  np.testing.assert_array_equal(np.sort(np.flatnonzero(got[0])) + 1, ref["calib_index"][0])


def test_cell_shift_rounds_half_patches_up():
  """The reference's remap: floor(off / P) plus one from half a patch on (its remainder is
  always >= 0), i.e. floor(off / P + 1/2)."""
  offs = np.arange(-40, 41)
  for p in (4, 7, 16, 32):
    got = np.asarray(smi.cell_shift(jnp.asarray(offs), p))
    np.testing.assert_array_equal(got, np.floor(offs / p + 0.5).astype(int))


def test_swin_is_refused_with_one_line():
  with pytest.raises(ValueError, match="method smi needs a ViT or DeiT"):
    synth.default_config("smi", "swin")


@pytest.mark.parametrize("at,ratio,match", [((3, 4), (0.3, 0.3), "at least 2 apart"),
                                             ((0,), (0.3,), "integers >= 1"),
                                             ((3,), (0.3, 0.3), "same length"),
                                             ((3,), (1.0,), r"\[0, 1\)")])
def test_bad_prune_schedule_names_the_field(at, ratio, match):
  cfg = synth.default_config("smi")
  cfg.smi_prune_at, cfg.smi_prune_ratio = at, ratio
  with pytest.raises(ValueError, match=match):
    smi.check_config(cfg)


def test_sparse_calibration_keeps_the_reference_calibration_tokens(case):
  """`VisionTransformer(sparse_patches=K)`, as quantize(..., sparse_patches=K) runs it on
  the calibration images: the class token, then the reference's `find_non_zero_patches`,
  and the same logits as the forward given those tokens."""
  module, params, _, _, _, ref = case
  k = ref["calib_index"].shape[1]
  sparse = module.clone(sparse_patches=k)
  images = jnp.asarray(ref["calib"])
  got = np.asarray(sparse.apply({"params": params}, images, method=sparse.nonzero_tokens))
  want = np.concatenate([np.zeros((len(images), 1), np.int64), ref["calib_index"]], axis=1)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(
      np.asarray(sparse.apply({"params": params}, images)),
      np.asarray(module.apply({"params": params}, images, keep=jnp.asarray(want))), rtol=1e-6)
  full = np.asarray(module.apply({"params": params}, images))
  assert np.abs(full - np.asarray(sparse.apply({"params": params}, images))).max() > 1e-3
