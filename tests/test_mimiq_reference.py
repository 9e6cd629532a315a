"""MimiQ against its generation script's own numbers (no torch needed).

tests/fixtures/make_mimiq_reference.py ran `generate` of hfutqian/MaskAQ's
`hydra_image_gen_ssim_att_map.py` (at 3245400; MaskAQ's own extra terms weighted 0) on a tiny
ViT (14 x 14 patches) and a tiny Swin (7 x 7 windows) for 6 steps on 2 images, and recorded
its draws (start, labels, roll offsets, noise and colour-jitter draws), its lr, its per-step
SSIM, CE and TV, and the images after the first and the last step. Here the same draws are
replayed through this package's MimiQ step.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spdfq_jax import models, synth
from spdfq_jax.models import zoo
from spdfq_jax.synth import layout as layout_lib
from spdfq_jax.synth import mimiq

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mimiq_reference")


@functools.lru_cache(maxsize=None)
def _case(name: str):
  with np.load(os.path.join(DIR, f"{name}.npz"), allow_pickle=False) as f:
    ref = dict(f)
  arch = json.loads(str(ref["arch"]))
  build = zoo.custom_swin if arch["family"] == "swin" else zoo.custom_vit
  module, params = models.load(build(**arch["kwargs"]), os.path.join(DIR, f"{name}.safetensors"))
  cfg = synth.default_config("mimiq", arch["family"])
  cfg.update(num_images=ref["images0"].shape[0], mean=tuple(ref["mean"].tolist()),
             std=tuple(ref["std"].tolist()), iterations=int(ref["steps"]))
  info = layout_lib.model_info(module, params, cfg)
  return module, params, cfg, info, ref


def replay(module, params, cfg, info, ref):
  """The package's objective and AdamW update, fed the reference's draws step by step from
  its start; returns the unweighted terms per step and the images after each step."""
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
  lo, hi = layout_lib.pixel_range(cfg, info.image_shape[-1])
  b = ref["images0"].shape[0]
  fixed = {"mask": jnp.ones(b), "targets": jax.nn.one_hot(ref["labels"], info.num_classes)}
  lr = mimiq.lr_schedule(cfg)

  @jax.jit
  def step(x, st, draws, lr):
    grad, terms = jax.grad(lambda x: mimiq.objective(module, params, x, fixed, draws, cfg, info),
                           has_aux=True)(x)
    x, st = mimiq.apply_update(adam, x, grad, st, lr, cfg, lo, hi)
    return x, st, terms

  x = jnp.asarray(ref["images0"])
  st = adam.init(x)
  terms, images = [], []
  for t in range(int(ref["steps"])):
    draws = {"shift_h": jnp.int32(ref["shift_h"][t]), "shift_w": jnp.int32(ref["shift_w"][t]),
             "flip": jnp.bool_(False), "noise": jnp.asarray(ref["noise"][t], jnp.float32),
             "mean": jnp.asarray(ref["cj_mean"][t], jnp.float32),
             "std": jnp.asarray(ref["cj_std"][t], jnp.float32)}
    x, st, tm = step(x, st, draws, lr[t])
    terms.append({"ssim": float(tm["ssim"]) / cfg.mimiq_ssim_weight,
                  "ce": float(tm["ce"]) / cfg.mimiq_ce_weight,
                  "tv": float(tm["tv"]) / cfg.tv_weight})
    images.append(np.asarray(x))
  return terms, images


@functools.lru_cache(maxsize=None)
def _replayed(name: str):
  return replay(*_case(name))


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def test_fixture_names_the_reference_commit():
  ref = _case("vit")[-1]
  commit = str(ref["reference_commit"])
  assert commit.startswith("3245400") and len(commit) == 40


def test_defaults_are_the_scripts():
  d = synth.default_config("mimiq")
  assert (d.iterations, d.lr, d.b1, d.b2, d.eps) == (2000, 0.1, 0.9, 0.999, 1e-8)
  assert (d.mimiq_weight_decay, d.mimiq_lr_min) == (1e-6, 0.001)
  assert (d.mimiq_ssim_weight, d.mimiq_ce_weight, d.tv_weight, d.tv_mode) == (1.0, 1.0, 2.5e-5,
                                                                              "min")
  assert tuple(d.jitter) == (8, 16) and d.jitter_reference == 224 and not d.flip
  assert d.mimiq_noise_std == 0.5 and tuple(d.mimiq_color_jitter) == (1.0, 1.0)
  assert not (d.apa or d.msr or d.sl or d.entropy or d.clamp_init)


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_plan_equals_reference(name):
  """lr (cosine to 0.001), GaussianNoise's scale (with its wrap at the last step) and the
  roll limits (8 px for t < T / 2, then 16) are the script's."""
  module, params, cfg, info, ref = _case(name)
  np.testing.assert_allclose(mimiq.lr_schedule(cfg), ref["lr"], rtol=1e-6)
  np.testing.assert_allclose(mimiq.noise_scales(cfg), ref["noise_scale"], rtol=1e-6)
  limit = mimiq.jitter_limits(cfg, 224)
  np.testing.assert_array_equal(limit, [8, 8, 8, 16, 16, 16])
  for s in ("shift_h", "shift_w"):
    assert (np.abs(ref[s]) <= limit).all()
  plan = mimiq.make_plan(cfg, info)
  assert (np.abs(plan.shift_h) <= limit).all() and not plan.flip.any()


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_terms_each_step_equal_reference(name):
  """SSIM, CE and TV of every step along the replayed run, to float tolerance."""
  terms, _ = _replayed(name)
  ref = _case(name)[-1]
  for k in ("ssim", "ce", "tv"):
    got = [t[k] for t in terms]
    assert rel(got, ref[k]) < 1e-4, (k, got, ref[k].tolist())
  total = [t["ssim"] + t["ce"] + 2.5e-5 * t["tv"] for t in terms]
  assert rel(total, ref["total"]) < 1e-4


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_images_after_the_steps_equal_reference(name):
  """The image after the first step and after the last: the displacement from the start
  has cosine 1 with the reference's, and all but a few pixels sit within 5e-4 of it. A
  pixel whose first gradient is about Adam's eps away from zero may take a step of another
  size (measured: one pixel of 301056 off by 0.005, a twentieth of the lr)."""
  _, images = _replayed(name)
  ref = _case(name)[-1]
  x0 = ref["images0"]
  for got, want in ((images[0], ref["after1"]), (images[-1], ref["last"])):
    d_got, d_want = (got - x0).ravel(), (want - x0).ravel()
    cos = d_got @ d_want / (np.linalg.norm(d_got) * np.linalg.norm(d_want))
    diff = np.abs(got - want)
    assert cos > 0.99999, cos
    assert np.quantile(diff, 0.9999) < 5e-4 and diff.max() < 0.01, (np.quantile(diff, 0.9999),
                                                                    diff.max())


def test_draws_depend_on_image_index_not_position():
  cfg = synth.default_config("mimiq")
  row = {"step": jnp.int32(5), "shift_h": jnp.int32(0), "shift_w": jnp.int32(0),
         "flip": jnp.bool_(False), "noise_scale": jnp.float32(0.3)}
  full = mimiq.augment_draws(cfg, row, jnp.arange(4), 3)
  part = mimiq.augment_draws(cfg, row, jnp.asarray([3, 1]), 3)
  for k in ("noise", "mean", "std"):
    np.testing.assert_array_equal(np.asarray(part[k]), np.asarray(full[k])[[3, 1]])
  assert (np.asarray(full["std"]) >= np.exp(-1) - 1e-6).all()
  assert (np.abs(np.asarray(full["mean"])) <= 1).all()


def test_update_is_torch_adamw():
  """The update against torch's AdamW + CosineAnnealingLR as the script builds them, with a
  weight decay of 0.5 (the script's 1e-6 is below what the image check can see)."""
  with np.load(os.path.join(DIR, "adamw.npz")) as f:
    ref = dict(f)
  cfg = synth.default_config("mimiq")
  cfg.update(iterations=len(ref["lr"]), mimiq_weight_decay=float(ref["weight_decay"]))
  np.testing.assert_allclose(mimiq.lr_schedule(cfg), ref["lr"], rtol=1e-6)
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
  x = jnp.asarray(ref["x0"])
  st = adam.init(x)
  for t, lr in enumerate(mimiq.lr_schedule(cfg)):
    x, st = mimiq.apply_update(adam, x, jnp.asarray(ref["grads"][t]), st, lr, cfg, -np.inf,
                               np.inf)
    np.testing.assert_allclose(np.asarray(x), ref["x"][t], rtol=1e-5, atol=1e-5)
