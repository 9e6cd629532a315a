"""The synthesis, reconstruction and evaluation loops on an accelerator's terms: no
transfer per step (checked with jax's transfer guard and a count of every device-to-host
read), one compilation per shape, and the memory / precision options of the synthesis step
(remat, microbatches, bfloat16 matmuls) against the plain step."""
import dataclasses
import importlib
import os
import sys

import jax
import numpy as np
import pytest

from spdfq_jax import evaluate, parallel, quant
from spdfq_jax.models import zoo
from spdfq_jax.quant import weights as quant_weights

sys.path.insert(0, os.path.dirname(__file__))
import synth_child  # noqa: E402

G = importlib.import_module("spdfq_jax.synth.generate")  # the package re-exports `generate`
from spdfq_jax.synth import draws as draws_lib
from spdfq_jax.synth import layout as layout_lib
from spdfq_jax.synth import mimiq as mimiq_lib
from spdfq_jax.synth import plan as plan_lib
from spdfq_jax.synth import step as step_lib
R = importlib.import_module("spdfq_jax.quant.reconstruct")
C = importlib.import_module("spdfq_jax.quant.calibrate")


def _tiny_swin():
  return zoo.custom_swin(num_classes=10, img_size=16, patch_size=2, embed_dim=8, depths=(2, 2),
                         num_heads=(2, 4), window_size=4)


def _setup(cfg, module):
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  params = params["params"]
  info = layout_lib.model_info(module, params, cfg)
  blocks = layout_lib.apa_block_indices(info, cfg)
  labels = draws_lib.draw_labels(cfg, info)
  pri = draws_lib.draw_priors(module, params, cfg, info, blocks, None)
  fixed = {"targets": labels["targets"], "region_targets": labels["region_targets"],
           "priors": pri if cfg.apa else []}
  return (module, params, info, blocks, draws_lib.initial_images(cfg, info), fixed,
          plan_lib.make_plan(cfg, info))


def _run(cfg, module=None, plan=None, monkeypatch=None, **kw):
  """The loop's images on a tiny model. With pytest's `monkeypatch`, (images, reads): the
  loop alone runs under `jax.transfer_guard('disallow')`, and `reads` lists every
  device-to-host read it made (`_count_reads`). On the CPU backend the guard stops
  host-to-device transfers only (an implicit read such as float(array) passes there; on an
  accelerator it raises), so the reads are counted."""
  module, params, info, blocks, x0, fixed, default = _setup(cfg, module or synth_child.tiny_vit())
  run = lambda: G.optimise(module, params, cfg, info, blocks, x0, fixed, plan or default,
                           progress=False, **kw)
  if monkeypatch is None:
    return run()
  reads = []
  _count_reads(monkeypatch, reads)
  with jax.transfer_guard("disallow"):
    return run(), reads


class _CountingNumpy:
  """numpy, except that np.asarray / np.array of a jax.Array is recorded as a read."""

  def __init__(self, calls: list):
    self._calls = calls

  def __getattr__(self, name):
    real = getattr(np, name)
    if name not in ("asarray", "array"):
      return real
    def convert(a, *args, **kwargs):
      if isinstance(a, jax.Array):
        self._calls.append(f"np.{name}{a.shape}")
      return real(a, *args, **kwargs)
    return convert


def _count_reads(monkeypatch, calls: list) -> None:
  """Records every device-to-host read in `calls`: one entry per jax.device_get (however
  many leaves it fetches), one per implicit read of an array's value outside it (float(),
  bool(), int(), format, tolist: jax.Array._value), and one per np.asarray / np.array of a
  jax.Array in the loop modules (numpy reads a CPU array through the buffer protocol,
  past jax)."""
  from jax._src import array as jax_array
  inside = []
  real_get, value = jax.device_get, jax_array.ArrayImpl.__dict__["_value"]

  def device_get(x):
    calls.append("device_get")
    inside.append(1)
    try:
      return real_get(x)
    finally:
      inside.pop()

  def read(self):
    if not inside and self._npy_value is None:
      calls.append(f"implicit{self.shape}")
    return value.fget(self)

  monkeypatch.setattr(jax, "device_get", device_get)
  monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(read))
  for module in (G, R, evaluate, parallel, mimiq_lib):
    monkeypatch.setattr(module, "np", _CountingNumpy(calls))


def test_synthesis_reads_once_per_block_and_compiles_once(monkeypatch):
  """8 steps with log_every=3 read the device 3 times ([0,3), [3,6), [6,8)) plus the final
  images; nothing moves implicitly either way (transfer guard), the step compiles once,
  and images and per-step terms equal those of a run that reads after every step."""
  cfg = synth_child.tiny_config("spdfq", iterations=8, warmup=2, log_every=3)
  steps, made = [], []
  real_make = G.make_step
  monkeypatch.setattr(G, "make_step", lambda *a: made.append(real_make(*a)) or made[-1])
  got, reads = _run(cfg, monkeypatch=monkeypatch, callback=lambda s, t: steps.append((s, t)))
  assert reads == ["device_get"] * 4
  assert made[0]._cache_size() == 1
  monkeypatch.undo()
  ref_steps = []
  ref = _run(synth_child.tiny_config("spdfq", iterations=8, warmup=2, log_every=1),
             callback=lambda s, t: ref_steps.append((s, t)))
  np.testing.assert_array_equal(got, ref)
  assert [s for s, _ in steps] == list(range(8))
  assert steps == ref_steps


def test_nan_in_the_middle_of_a_block_names_its_step():
  """A NaN learning rate at step 4 makes the images, hence every term, NaN from step 5 on;
  the block [3, 6) read at once still reports step 5 and its terms."""
  cfg = synth_child.tiny_config("psaq", iterations=8, warmup=2, log_every=3)
  _, _, info, _, _, _, plan = _setup(cfg, synth_child.tiny_vit())
  lr = plan.lr.copy()
  lr[4] = np.nan
  with pytest.raises(FloatingPointError, match=r"not finite at step 5: ce=nan, entropy=nan"):
    _run(cfg, plan=dataclasses.replace(plan, lr=lr))


def _run_mimiq(cfg, plan=None, monkeypatch=None, **kw):
  """MimiQ's loop on the tiny ViT; with `monkeypatch`, (images, reads) as `_run`."""
  module = synth_child.tiny_vit()
  params = synth_child.tiny_params(module)
  info = layout_lib.model_info(module, params, cfg)
  x0 = draws_lib.initial_images(cfg, info)
  targets = draws_lib.draw_labels(cfg, info)["targets"]
  run = lambda: mimiq_lib.invert(module, params, cfg, info, x0, targets,
                                 plan or mimiq_lib.make_plan(cfg, info), progress=False, **kw)
  if monkeypatch is None:
    return run()
  reads = []
  _count_reads(monkeypatch, reads)
  with jax.transfer_guard("disallow"):
    return run(), reads


def test_mimiq_reads_once_per_block_and_compiles_once(monkeypatch):
  """MimiQ's loop as the PSAQ-ViT one: 8 steps with log_every=3 read the device 3 times
  plus the final images, the step compiles once, and the images and terms equal a run that
  reads after every step."""
  cfg = synth_child.tiny_config("mimiq", iterations=8, log_every=3)
  steps, made = [], []
  real_make = mimiq_lib.make_step
  monkeypatch.setattr(mimiq_lib, "make_step", lambda *a: made.append(real_make(*a)) or made[-1])
  got, reads = _run_mimiq(cfg, monkeypatch=monkeypatch,
                          callback=lambda s, t: steps.append((s, t)))
  assert reads == ["device_get"] * 4
  assert made[0]._cache_size() == 1
  monkeypatch.undo()
  ref_steps = []
  ref = _run_mimiq(synth_child.tiny_config("mimiq", iterations=8, log_every=1),
                   callback=lambda s, t: ref_steps.append((s, t)))
  np.testing.assert_array_equal(got, ref)
  assert steps == ref_steps and [s for s, _ in steps] == list(range(8))


def test_mimiq_nan_names_its_step():
  cfg = synth_child.tiny_config("mimiq", iterations=8, log_every=3)
  module = synth_child.tiny_vit()
  plan = mimiq_lib.make_plan(cfg, layout_lib.model_info(module, synth_child.tiny_params(module),
                                                        cfg))
  lr = plan.lr.copy()
  lr[4] = np.nan
  with pytest.raises(FloatingPointError, match=r"not finite at step 5: ce=nan, ssim=nan, tv=nan"):
    _run_mimiq(cfg, plan=dataclasses.replace(plan, lr=lr))


@pytest.mark.parametrize("family", ["vit", pytest.param("swin", marks=pytest.mark.slow)])
def test_remat_and_microbatches_give_the_same_images(family):
  """SPDFQ (APA, MSR, SL, batch TV) on 5 images: per-block remat, and 2 micro-batches (the
  batch padded to 6, the TV on the whole batch), give the plain step's loss terms at every
  step and move the pixels as it does. Remat and the split change only XLA's fusion, hence
  float rounding; Adam divides each pixel's gradient by its own running size, so where a
  gradient is near zero that rounding reaches the pixel at up to ~lr, which is why the images
  are held at 1e-4 (the step moves them by 0.1) and the terms at rtol 1e-5."""
  module = synth_child.tiny_vit() if family == "vit" else _tiny_swin()
  cfg = lambda **kw: synth_child.tiny_config("spdfq", iterations=4, warmup=1, **kw)
  terms = lambda log: np.array([[t[k] for k in sorted(t)] for _, t in log], np.float64)
  log = []
  plain = _run(cfg(), module, callback=lambda s, t: log.append((s, t)))
  x0 = _setup(cfg(), module)[4]
  assert np.abs(plain - x0).max() > 0.1  # the step moves pixels by about lr per step
  for variant in ({"remat": True}, {"microbatches": 2}):
    got_log = []
    got = _run(cfg(**variant), module, callback=lambda s, t: got_log.append((s, t)))
    np.testing.assert_allclose(terms(got_log), terms(log), rtol=1e-5, err_msg=variant)
    np.testing.assert_allclose(got, plain, atol=1e-4, err_msg=variant)


def test_remat_is_in_the_compiled_step():
  """remat really recomputes: the step's program holds a checkpoint (remat) region."""
  cfg = synth_child.tiny_config("spdfq", remat=True)
  module, params, info, blocks, x0, fixed, plan = _setup(cfg, synth_child.tiny_vit())
  net = step_lib.step_module(module, cfg)
  text = str(jax.make_jaxpr(jax.grad(lambda x: net.apply({"params": params}, x).sum()))(x0))
  assert "checkpoint" in text or "remat" in text
  plain = step_lib.step_module(module, synth_child.tiny_config("spdfq"))
  text = str(jax.make_jaxpr(jax.grad(lambda x: plain.apply({"params": params}, x).sum()))(x0))
  assert "checkpoint" not in text and "remat" not in text


def test_microbatches_refused_with_the_entropy_term():
  """PSAQ-ViT's entropy term couples the images (batch grid) and did not split exactly with
  the per-image grid either: both refused, naming the field."""
  for grid in ("batch", "image"):
    with pytest.raises(ValueError, match="synth.microbatches"):
      _run(synth_child.tiny_config("psaq", iterations=2, microbatches=2, entropy_grid=grid))


def test_bfloat16_matmuls_stay_close_to_float32():
  """compute_dtype='bfloat16': images stay float32 and finite; the first step's loss terms
  (same images, only the matmuls differ) are within 2% of the float32 run's (bfloat16
  keeps 8 significant bits), yet not equal (the matmuls really ran on bfloat16). Later
  steps drift apart through Adam (APA 4% after 4 steps on this tiny model)."""
  cfg = lambda **kw: synth_child.tiny_config("spdfq", iterations=4, warmup=1, **kw)
  terms = {}
  for dtype in ("float32", "bfloat16"):
    log = []
    x = _run(cfg(compute_dtype=dtype), callback=lambda s, t: log.append(t))
    assert x.dtype == np.float32 and np.isfinite(x).all()
    terms[dtype] = log
  stats = {"prior_fit"}  # a chance-level correlation (~1e-3) here, not a loss term
  a, b = terms["float32"][0], terms["bfloat16"][0]
  for k in set(a) - stats:
    assert b[k] == pytest.approx(a[k], rel=2e-2, abs=1e-4), k
  assert terms["float32"][0]["ce"] != terms["bfloat16"][0]["ce"]


def test_runtime_fields_are_not_part_of_the_identity():
  from spdfq_jax.synth import config as synth_config
  base = synth_child.tiny_config("spdfq")
  same = synth_child.tiny_config("spdfq", log_every=7, remat=True, microbatches=4)
  assert synth_config.identity(same) == synth_config.identity(base)
  assert "compute_dtype" not in synth_config.identity(base)  # as before the field existed
  other = synth_child.tiny_config("spdfq", compute_dtype="bfloat16")
  assert synth_config.identity(other) != synth_config.identity(base)


def test_smi_fields_are_part_of_smis_identity_only():
  """A config block shared by every row (configs/fmnist_w4a4.py sets smi_jitter=0) keeps
  the other methods' identities, and with them their cached images."""
  from spdfq_jax.synth import config as synth_config
  for method in ("psaq", "spdfq"):
    base = synth_child.tiny_config(method)
    assert synth_config.identity(synth_child.tiny_config(method, smi_jitter=0.0)) == \
        synth_config.identity(base)
  smi = synth_child.tiny_config("smi")
  assert synth_config.identity(synth_child.tiny_config("smi", smi_jitter=0.0)) != \
      synth_config.identity(smi)


def test_mimiq_fields_are_part_of_mimiqs_identity_only():
  """MimiQ's fields (in every config, as SMI's are) never enter another method's identity,
  so the runs cached before MimiQ existed keep theirs."""
  from spdfq_jax.synth import config as synth_config
  for method in ("noise", "inversion", "psaq", "spdfq", "smi"):
    ident = synth_config.identity(synth_child.tiny_config(method))
    assert not any(k.startswith("mimiq_") for k in ident), method
    assert synth_config.identity(synth_child.tiny_config(method, mimiq_noise_std=0.0)) == ident
  mimiq = synth_child.tiny_config("mimiq")
  assert synth_config.identity(synth_child.tiny_config("mimiq", mimiq_noise_std=0.0)) != \
      synth_config.identity(mimiq)


@pytest.fixture(scope="module")
def recon_inputs():
  module = zoo.custom_vit(img_size=16, patch_size=8, width=16, depth=2, num_heads=2,
                          num_classes=10)
  images = np.random.RandomState(0).randn(6, 16, 16, 3).astype(np.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images[:1])["params"]
  params = jax.tree_util.tree_map(np.asarray, params)
  cfg = quant.default_config(4, 4, recon_iters=5, w_method="minmax", reparam=False)
  qstate = C.calibrate(module, params, images, cfg)
  return module, params, qstate, quant_weights.weight_state(params, cfg), images, cfg


def test_reconstruction_reads_once_per_block(recon_inputs, monkeypatch):
  """4 units x 5 steps with log_every=2: per unit 3 loss reads ([0,2), [2,4), [4,5)) and
  one weights check, no implicit transfer; the weights equal those of a run that reads
  after every step."""
  module, params, qstate, wstate, images, cfg = recon_inputs
  cfg = cfg.copy_and_resolve_references()
  cfg.recon.log_every = 2
  R._step.clear_cache()
  reads = []
  _count_reads(monkeypatch, reads)
  with jax.transfer_guard("disallow"):
    got, log = R.reconstruct(module, params, qstate, wstate, images, cfg, progress=False)
  assert reads == ["device_get"] * 4 * (3 + 1)
  monkeypatch.undo()
  cfg.recon.log_every = 1
  ref, ref_log = R.reconstruct(module, params, qstate, wstate, images, cfg, progress=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)
  assert log == ref_log


def test_reconstruction_compiles_once_per_unit(recon_inputs):
  module, params, qstate, wstate, images, cfg = recon_inputs
  R._step.clear_cache()
  R.reconstruct(module, params, qstate, wstate, images, cfg, progress=False)
  assert R._step._cache_size() == 4


def test_evaluation_reads_once(monkeypatch):
  """7 batches (the last short) are counted on the device and read once, at the end; the
  counts equal numpy's on the same logits."""
  rng = np.random.RandomState(0)
  w = rng.randn(12, 10).astype(np.float32)
  images = rng.randn(55, 12).astype(np.float32)
  labels = rng.randint(0, 10, 55).astype(np.int32)
  batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 55, 8)]
  reads = []
  _count_reads(monkeypatch, reads)
  with jax.transfer_guard("disallow"):
    got = evaluate.evaluate(lambda x: x @ w, batches, batch_size=8, total=55)
  assert reads == ["device_get"]
  monkeypatch.undo()
  top5 = np.argsort(-(images @ w), axis=1)[:, :5]
  assert got["top1"] == pytest.approx(100 * np.mean(top5[:, 0] == labels))
  assert got["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)))
