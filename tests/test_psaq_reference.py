"""The PSAQ-ViT loop against the reference code's own numbers (no torch needed).

tests/fixtures/make_psaq_reference.py ran zkkli/PSAQ-ViT's `generate_data.py` on tiny timm
models (ViT with a class token, Swin with windows) for 5 steps crossing the round boundary
and recorded its draws, losses, gradients and images; here the same draws are replayed
through this package's loop.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parity_util
from spdfq_jax.models import taps
from spdfq_jax.synth import losses

G = importlib.import_module("spdfq_jax.synth.generate")  # the package re-exports `generate`
from spdfq_jax.synth import objective as objective_lib
from spdfq_jax.synth import plan as plan_lib


@pytest.fixture(scope="module", params=["vit", pytest.param("swin", marks=pytest.mark.slow)])
def case(request):
  return (request.param,) + parity_util.psaq_case(request.param)


_plan = parity_util.psaq_plan
_cos = parity_util.cosine


def _device_fixed(fixed, b):
  return {"mask": jnp.ones(b), "index": jnp.arange(b), "targets": jnp.asarray(fixed["targets"]),
          "region_targets": jnp.asarray(fixed["region_targets"]), "priors": []}


def _rel(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_fixture_names_the_reference_commit(case):
  *_, ref = case
  assert len(str(ref["reference_commit"])) == 40


def test_lr_schedule_equals_reference(case):
  _, _, _, cfg, _, _, ref = case
  assert cfg.lr == pytest.approx(float(ref["base_lr"]))
  lr = plan_lib.lr_schedule(cfg)
  np.testing.assert_allclose(lr[:500], ref["round_lr"], rtol=1e-6)
  np.testing.assert_allclose(lr[500:], ref["round_lr"], rtol=1e-6)  # restarts, same shape
  np.testing.assert_allclose(lr[ref["round_of_step"] * 500 + ref["itr_of_step"]], ref["lr"],
                             rtol=1e-6)


@pytest.mark.parametrize("k", [0, 1])
def test_loss_terms_and_gradient_equal_reference(case, k):
  """Step 0 (from the unclamped start) and step 3 (round 2's first) from the reference's
  own input images: per-block entropy, CE, TV and total to 1e-4, gradient cosine 0.9999."""
  _, module, params, cfg, info, fixed, ref = case
  step = int(ref["grad_steps"][k])
  x = ref["images0"] if step == 0 else ref["images"][list(ref["image_steps"]).index(step - 1)]
  x = jnp.asarray(x)
  row = _plan(ref, None).row(step)
  b = x.shape[0]
  dev = _device_fixed(fixed, b)

  xa = objective_lib.augment(x, row["shift"], row["flip"])
  _, _, attn_vs = taps.apply_with_attention(module, {"params": params}, xa)
  ent = losses.block_entropies(attn_vs, info.heads, objective_lib.entropy_skip(cfg, info), b,
                               cfg.entropy_bandwidth, cfg.entropy_points, jnp.ones(b))
  np.testing.assert_allclose([float(e.mean()) for e in ent], ref["entropy"][step], rtol=1e-4,
                             atol=1e-6)

  def objective(x):
    terms, _ = objective_lib.loss_terms(module, params, x, dev, row, cfg, info, ())
    return sum(terms.values()), terms

  (total, terms), grad = jax.value_and_grad(objective, has_aux=True)(x)
  assert _rel(terms["ce"], ref["ce"][step]) <= 1e-4
  want_tv = 0.05 * abs(ref["tv"][step] - ref["tv_target"])
  assert _rel(terms["tv"], want_tv) <= 1e-4
  assert _rel(total, ref["total"][step]) <= 1e-4
  assert _cos(grad, ref["grad"][k]) >= 0.9999


def test_five_steps_across_rounds_equal_reference(case):
  """One Adam optimiser over both rounds, the per-round lr, unclamped start, clip after
  each step: the images after steps 2 and 4 move as the reference's did."""
  _, module, params, cfg, info, fixed, ref = case
  x0 = ref["images0"]
  for k, step in enumerate(ref["image_steps"]):
    got = G.optimise(module, params, cfg, info, (), x0, fixed, _plan(ref, int(step) + 1),
                     progress=False)
    want = ref["images"][k]
    assert _cos(got - x0, want - x0) >= 0.999, step
    # Adam moves a pixel by about lr whatever its gradient's size, so the few pixels with
    # a near-zero gradient may go either way in float32; all the others agree to 1e-4.
    assert (np.abs(got - want) > 1e-4).mean() < 1e-3, step


def test_per_image_grid_variant_differs(case):
  """The per-image KDE grid (entropy_grid='image') is a real change, not a no-op."""
  _, module, params, cfg, info, fixed, ref = case
  x = jnp.asarray(ref["images0"])
  b = x.shape[0]
  _, _, attn_vs = taps.apply_with_attention(module, {"params": params}, x)
  skip = objective_lib.entropy_skip(cfg, info)
  batch = losses.patch_entropy_loss(attn_vs, info.heads, skip, b, mask=jnp.ones(b))
  image = losses.patch_entropy_loss(attn_vs, info.heads, skip, b)
  assert _rel(image, np.asarray(batch)) > 1e-3
