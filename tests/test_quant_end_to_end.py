"""The whole quantization stage against I&S-ViT's end state (no torch needed).

tests/fixtures/make_quant_reference.py ran zysxmu/IaS-ViT's `test_quant.py` `main()` through
all three stages on the tiny ViT (W4A4) and Swin (W3A3) of the step fixtures: 8 calibration
images, 2 Adam steps per unit on batches of 4, and recorded each step's batch, every quantizer
after each stage, all parameters after each stage and the final logits
(`quant_reference/e2e-*.npz`). Here this package's default `quant.quantize` runs on the same
images, replaying those batches, and every recorded value is held. What float32 allows:
Adam's first steps move a parameter by about lr whatever the size of its gradient, so where
the gradient is float noise the two sides may step in opposite directions (the key bias, to
which softmax is invariant, always; elsewhere few elements: one in the ViT, about 1% of
Swin's 3-bit layers.1.blocks.0, where a rounding inside the block tips); the trained values
are therefore held to 1e-3 of each tensor's largest value and their updates by direction
(cosine >= 0.999), the states and logits tightly. Swin's `embed` unit is matched on the patch
convolution's output before its LayerNorm, as the reference reconstructs that convolution
(`zoo.unit_target_method`; matched after the LayerNorm, its stage-three update was cosine
0.86 (kernel) and 0.48 (bias) from the reference's, now above 0.9999). Swin's stage three is
still expected to fail (SWIN_STAGE3 below).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np
import pytest

import parity_util as P
import test_quant_reference as T
from spdfq_jax import models, quant
from spdfq_jax.models import convert, zoo
from spdfq_jax.quant import api

pytestmark = pytest.mark.slow  # two full `quantize` runs (compiling every unit's steps)

STAGES = ("stage1", "stage2", "stage3")
# Evaluation images whose logits a float32 tie tips (test_logits_equal_reference).
TIPPED = {"vit": {}, "swin": {"stage1": [4, 6]}}
# Open: with the patch embedding now equal, Swin's stage-three blocks still step apart from
# the reference's (update cosines 0.15-0.99, 5-40% of the elements with the other sign; the
# 4-bit ViT's are above 0.999999). Suspected, not shown: 3-bit roundings in the blocks tipped
# by the embedding's float-level difference, to which Adam's sign-like first steps are blind
# in size but not in sign.
SWIN_STAGE3 = ("Swin's stage-three blocks step apart from the reference's (cause open: "
               "docs/quantization.md)")


class Run(NamedTuple):
  name: str
  module: Any
  ref: dict
  fp: dict  # the FP params quantize started from
  states: dict  # stage -> (activation state, weight state)
  params: dict  # stage -> params after it (stage2: reparameterised)
  logits: dict  # stage1 (activations quantized, weights FP), stage3 -> (images, classes)


def e2e_case(name: str) -> tuple[Any, dict, dict]:
  """(module, FP params, reference arrays) of `quant_reference/e2e-<name>-*.npz`."""
  (npz,) = [f for f in os.listdir(P.QUANT_DIR) if f.startswith(f"e2e-{name}-")]
  with np.load(os.path.join(P.QUANT_DIR, npz), allow_pickle=False) as f:
    ref = dict(f)
  arch = json.loads(str(ref["arch"]))
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch["kwargs"].items()}
  build = zoo.custom_swin if arch["family"] == "swin" else zoo.custom_vit
  module, params = models.load(build(**kwargs), os.path.join(P.QUANT_DIR, str(ref["model"])))
  return module, params, ref


@pytest.fixture(scope="module", params=P.QUANT_FIXTURES)
def run(request) -> Run:
  """One `quant.quantize` per model, its stages observed at `reconstruct`'s calls."""
  name = request.param
  module, params, ref = e2e_case(name)
  cfg = quant.default_config(int(ref["w_bits"]), int(ref["a_bits"]),
                             recon_iters=int(ref["iters"]),
                             recon_batch_size=int(ref["batch_size"]))
  calls = []
  reconstruct = api.reconstruct

  def spy(module_, params_, qstate, wstate, *a, **k):
    out = reconstruct(module_, params_, qstate, wstate, *a, **k)
    calls.append((params_, qstate, wstate, out[0]))
    return out

  # Tiny models, a few steps: compiling dominates, and XLA's optimisation passes most of it.
  optimized = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(api, "reconstruct", spy)
      qm = quant.quantize(module, params, ref["calib_images"], cfg, progress=False,
                          draws=(ref["draws/stage1"], ref["draws/stage3"]))
    assert len(calls) == 2, len(calls)
    (_, qs1, ws1, p1), (p2, qs2, ws2, p3) = calls
    assert not ws1  # stage one: weights FP
    logits = {"stage1": np.asarray(T.logits(module, cfg, p1, qs1, {}, ref["eval_images"])),
              "stage3": np.asarray(qm.logits(ref["eval_images"]))}
  finally:
    jax.config.update("jax_disable_most_optimizations", optimized)
  states = {"stage1": (qs1, {}), "stage2": (qs2, ws2),
            "stage3": (qm.variables["quant"], qm.variables["wquant"])}
  return Run(name, module, ref, params, states, {"stage1": p1, "stage2": p2, "stage3": p3},
             logits)


def ref_params(r: Run, stage: str) -> dict:
  """The reference's parameters after `stage`, flat, in this package's layout."""
  _, p = convert.load_state_dict(r.module, P.state_dict(r.ref, f"sd/{stage}/"))
  return T.flat(p)


def noise(r: Run, key: str, shape: tuple) -> np.ndarray:
  """Elements whose gradient is float noise on both sides: the key part of a qkv bias
  (softmax is invariant to it; only clipping in the key's quantizer breaks that)."""
  mask = np.zeros(shape, bool)
  if key.endswith("attn/qkv/bias"):
    n = shape[-1] // 3
    mask[..., n:2 * n] = True
  return mask


@contextlib.contextmanager
def swin_stage3(r: Run, stage: str) -> Iterator[None]:
  """Expects Swin's stage three to fail (SWIN_STAGE3), strictly: once it holds, this fails."""
  if r.name != "swin" or stage != "stage3":
    yield
    return
  try:
    yield
  except AssertionError:
    pytest.xfail(SWIN_STAGE3)
  pytest.fail("Swin's stage three now equals the reference: drop the expected failure")


def test_fixture_names_its_commit_and_model(run):
  assert str(run.ref["reference_commit"]) == "9300cea8db6292d9d3d6727321c7f1100360e191"
  assert str(run.ref["model"]).startswith(run.name + "-9300cea")


def test_draws_cover_every_unit_in_order(run):
  """The reference reconstructs the patch-embedding conv, Swin's `reduction` and the head as
  layers: the same units as this package's `embed`, `downsample` and `head`, in order."""
  ours = [u for u, _ in zoo.units(run.module)]
  theirs = [{"patch_embed.proj": "embed", "head.fc": "head"}.get(u, u.removesuffix(".reduction"))
            for u in run.ref["units"].tolist()]
  assert theirs == ours
  n, iters, bs = len(ours), int(run.ref["iters"]), int(run.ref["batch_size"])
  for stage in ("stage1", "stage3"):
    d = run.ref[f"draws/{stage}"]
    assert d.shape == (n, iters, bs) and d.min() >= 0 and d.max() < len(run.ref["calib_images"])


@pytest.mark.parametrize("stage", STAGES)
def test_quantizer_states_equal_reference(run, stage):
  """Every activation quantizer after stage one (the sequential calibration), every one and
  every weight quantizer after stage two (per tensor after the reparameterisation; weight
  ranges of the reparameterised, stage-one-trained weights) and after stage three (frozen).
  Scales to 1e-5, or 1e-4 for the weights' (their ranges are quantiles of weights trained
  in stage one; see the module docstring); zero points and shifts exactly."""
  acts, weights = T.ours(run.name, run.module, run.ref, f"state/{stage}/")
  got_acts, got_weights = (T.flat(s) for s in run.states[stage])
  T.compare_states(got_acts, acts)
  T.compare_states(got_weights, weights, rtol=1e-4)


@pytest.mark.parametrize("stage", STAGES)
def test_parameters_equal_reference(run, stage):
  """All parameters after each stage: the same ones trained (the rest unchanged), each within
  1e-3 of its largest value, and every trained tensor's update in the reference's direction
  (cosine >= 0.999, float-noise elements aside) with the noise elements inside Adam's bound."""
  with swin_stage3(run, stage):
    hold_parameters(run, stage)


def test_swin_patch_embedding_steps_as_the_reference(run):
  """Stage three's patch-embedding update on its own (the rest of Swin's stage three is an
  expected failure): matched before its LayerNorm, as the reference's conv, its direction
  holds (after the LayerNorm it was cosine 0.86 / 0.48)."""
  got, want = T.flat(run.params["stage3"]), ref_params(run, "stage3")
  start, want_start = T.flat(run.params["stage2"]), ref_params(run, "stage2")
  keys = [k for k in want if k.startswith("patch_embed/") and not k.startswith("patch_embed/norm")]
  assert keys
  for key in keys:
    d_got = np.asarray(got[key], np.float64) - np.asarray(start[key], np.float64)
    d_want = np.asarray(want[key], np.float64) - np.asarray(want_start[key], np.float64)
    assert P.cosine(d_got, d_want) >= 0.999, (key, P.cosine(d_got, d_want))


def hold_parameters(run: Run, stage: str) -> None:
  got, want = T.flat(run.params[stage]), ref_params(run, stage)
  assert set(got) == set(want), sorted(set(got) ^ set(want))
  start = {"stage1": T.flat(run.fp), "stage2": T.flat(run.fp),
           "stage3": T.flat(run.params["stage2"])}[stage]
  want_start = {"stage1": T.flat(run.fp), "stage2": T.flat(run.fp),
                "stage3": ref_params(run, "stage2")}[stage]
  lr = quant.default_config().recon.lr
  bound = 1.01 * sum(lr * 0.5 * (1 + np.cos(np.pi * i / int(run.ref["iters"])))
                     for i in range(int(run.ref["iters"])))
  trained = 0
  for key, w in want.items():
    g = np.asarray(got[key], np.float64)
    w = np.asarray(w, np.float64)
    assert P.rel_err(g, w) <= 1e-3, (key, P.rel_err(g, w))
    d_got = g - np.asarray(start[key], np.float64)
    d_want = w - np.asarray(want_start[key], np.float64)
    if not np.any(d_want):
      np.testing.assert_array_equal(d_got, 0, err_msg=key)
      continue
    trained += 1
    if stage == "stage2":
      continue  # not trained: the reparameterisation, held by value above
    mask = noise(run, key, d_want.shape)
    assert np.abs(d_got[mask]).max(initial=0) <= bound, key
    assert P.cosine(d_got[~mask], d_want[~mask]) >= 0.999, (key, P.cosine(d_got[~mask],
                                                                        d_want[~mask]))
  assert trained > 0


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_logits_equal_reference(run, stage):
  """The logits on the recorded evaluation images after stage one (weights FP) and of the
  fully quantized model, per image to 1e-4 of the largest. At 3 bits, Swin's images 4 and 6
  after stage one are the exceptions: with the reference's own states and parameters this
  package's forward gives every image to 1e-7, but image 4 has an activation on a rounding
  boundary that the states' float32 differences (<= 2e-6) tip, and image 6 one that the
  few float-noise elements of layers.1.blocks.0's update tip."""
  got, want = run.logits[stage], run.ref[f"logits/{stage}"]
  off = np.abs(got - want).max(axis=1) > 1e-4 * np.abs(want).max()
  with swin_stage3(run, stage):
    assert np.flatnonzero(off).tolist() == TIPPED[run.name].get(stage, []), np.abs(got - want).max(1)


def test_draws_must_cover_every_unit():
  """A replay that does not fit the units or `recon.iters` is refused before any step."""
  module, params, ref = e2e_case("vit")
  cfg = quant.default_config(4, 4, recon_iters=2, recon_batch_size=4)
  draws = list(ref["draws/stage3"])
  for bad in (draws[:-1], [d[:1] for d in draws]):
    with pytest.raises(ValueError, match="one \\(recon.iters=2, batch\\) index array per unit"):
      api.reconstruct(module, params, {}, {}, ref["calib_images"], cfg, progress=False,
                      draws=bad)
