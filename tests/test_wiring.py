"""What each stage is handed: the pipeline's wiring of settings, images and seeds into the
stages, checked against an independent computation of what they should receive (the
stage functions recorded by fakes with the real signatures; the model is a tiny ViT)."""
import functools
import os

import jax
import numpy as np
import pytest

from spdfq_jax import main
from spdfq_jax.data import fashion_mnist
from spdfq_jax.models import zoo
from spdfq_jax.quant import config as quant_config
from spdfq_jax.synth import config as synth_config

TINY = dict(img_size=32, patch_size=8, width=16, depth=2, num_heads=2, num_classes=10)
FMNIST = os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST, reason="needs the Fashion-MNIST IDX files")


@functools.lru_cache(None)
def _tiny_model():
  module = zoo.custom_vit(**TINY)
  init = jax.jit(module.init)
  return module, init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32))["params"]


class Recorder:
  """Stages that record what the pipeline hands them; generate draws images from the seed
  it is given (and, as SMI does, a set of kept patches)."""

  def __init__(self, kept: int = 0):
    self.kept = kept
    self.synth_cfgs, self.quantized = [], []

  def stages(self):
    return main.Stages(lambda name, path=None: _tiny_model(), synth_config.default_config,
                       self.generate, quant_config.default_config, self.quantize, None)

  def generate(self, module, params, cfg, workdir=None):
    self.synth_cfgs.append(cfg)
    rng = np.random.default_rng(1000 + cfg.seed)
    kept = (np.tile(np.arange(self.kept, dtype=np.int32), (cfg.num_images, 1))
            if self.kept else None)

    class R:
      images = rng.normal(size=(cfg.num_images, 32, 32, 1)).astype(np.float32)
      diagnostics = {}
      kept_patches = kept
    return R

  def quantize(self, module, params, images, cfg, workdir=None, **kw):
    self.quantized.append((np.array(images), cfg, kw))
    apply = jax.jit(module.apply)

    class Q:
      timings = {}
      def logits(self, x):
        return apply({"params": params}, x)
    return Q()


def _config(methods, bits, seed):
  from configs import fmnist_w4a4
  c = fmnist_w4a4.get_config()
  c.unlock()
  c.methods, c.bits, c.seed, c.num_images = methods, bits, seed, 4
  c.eval.limit, c.eval.batch_size = 20, 10
  c.export = False
  return c


@needs_fmnist
def test_synthetic_row_hands_its_images_bits_and_seeds_to_the_stages(tmp_path):
  rec = Recorder()
  out = main.run(_config("spdfq", "w3a5", seed=3), str(tmp_path), rec.stages())
  (scfg,) = rec.synth_cfgs
  assert scfg.seed == 3 and scfg.num_images == 4 and scfg.method == "spdfq"
  (images, qcfg, kw), = rec.quantized
  want = np.random.default_rng(1003).normal(size=(4, 32, 32, 1)).astype(np.float32)
  np.testing.assert_array_equal(images, want)  # every synthesised image, as generated
  assert (qcfg.weights.bits, qcfg.acts.bits) == (3, 5)
  assert qcfg.recon.seed == 3  # the run's seed, unless quant.recon.seed is set
  assert kw == {}
  (row,) = out["rows"]
  assert (row["w_bits"], row["a_bits"]) == (3, 5)
  # eval.integer is on in the config: the integer path was asked for (and a model without
  # one says so), not switched off.
  assert row["eval_path"] == "fake-quant (Q has no integer path)"


@needs_fmnist
def test_smi_row_calibrates_on_its_kept_patches_only_when_asked(tmp_path):
  rec = Recorder(kept=5)
  main.run(_config("smi", "w4a4", seed=0), str(tmp_path / "a"), rec.stages())
  assert rec.quantized[-1][2] == {"sparse_patches": 5}
  c = _config("smi", "w4a4", seed=0)
  c.synth.smi_calibrate_kept = False
  main.run(c, str(tmp_path / "b"), rec.stages())
  assert rec.quantized[-1][2] == {}


@needs_fmnist
def test_real_row_calibrates_on_the_training_images_of_the_run_seed(tmp_path):
  rec = Recorder()
  main.run(_config("real", "w4a4", seed=3), str(tmp_path), rec.stages())
  (images, _, _), = rec.quantized
  want, _ = fashion_mnist.calibration_images(4, 3, None, 1)
  np.testing.assert_array_equal(images, want)


def test_reconstruction_feeds_each_unit_the_inputs_of_its_stage():
  """Weight reconstruction (I&S-ViT's stage three) trains each unit on the quantized
  model's own inputs (the outputs of the already reconstructed units); the FP-input stage
  (stage one) on the FP model's. With one step per unit and the whole set as its batch,
  each unit's first loss is the loss on those inputs, recomputed here unit by unit."""
  from spdfq_jax.quant import qmodel, weights
  from spdfq_jax.quant.calibrate import calibrate
  from spdfq_jax.quant.reconstruct import reconstruct
  module, params = _tiny_model()
  params = jax.tree_util.tree_map(np.asarray, params)
  images = np.random.default_rng(0).normal(size=(8, 32, 32, 1)).astype(np.float32)
  cfg = quant_config.default_config(4, 4, recon_iters=1, recon_batch_size=8, recon_lr=1e-2)
  qstate = calibrate(module, params, images, cfg)
  qmod = qmodel.quant_module(module, cfg)
  run_unit = lambda mod, variables, name, x: np.asarray(  # noqa: E731
      mod.apply(variables, name, x, method="run_unit"))
  for fp_inputs, wstate in ((False, weights.weight_state(params, cfg)), (True, {})):
    trained, log = reconstruct(module, params, qstate, wstate, images, cfg, progress=False,
                               teacher=params, fp_inputs=fp_inputs)
    units = zoo.units(module)
    assert [e["unit"] for e in log] == [name for name, _ in units]
    before = {"params": weights.quantize_weights(params, wstate, cfg), "quant": qstate}
    after = {"params": weights.quantize_weights(trained, wstate, cfg), "quant": qstate}
    x_fp = x_q = images
    for (name, _), entry in zip(units, log):
      y_fp = run_unit(module, {"params": params}, name, x_fp)
      out = run_unit(qmod, before, name, x_fp if fp_inputs else x_q)
      want = np.mean(np.sum((out.astype(np.float64) - y_fp) ** 2, axis=1))
      np.testing.assert_allclose(entry["loss_first"], want, rtol=1e-4, err_msg=name)
      x_q = run_unit(qmod, after, name, x_q)  # a unit's weights change only in its own turn
      x_fp = y_fp


def test_real_priors_are_the_attention_of_real_image_i_mod_n():
  """`prior='real'`: image i's prior is the CLS attention row (over the patch tokens,
  renormalised) of real image i mod len(real_images), taken here from each real image's
  own forward."""
  from spdfq_jax import synth
  from spdfq_jax.models import taps
  from spdfq_jax.synth import draws, layout
  module = zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=4,
                          num_heads=2)
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map(  # attention far from uniform
      lambda v: np.asarray(v) + 0.5 * rng.randn(*v.shape).astype(np.float32),
      jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"])
  real = rng.randn(3, 16, 16, 3).astype(np.float32)
  cfg = synth.default_config("spdfq")
  cfg.update(prior="real", num_images=5)
  info = layout.model_info(module, params, cfg)
  blocks = layout.apa_block_indices(info, cfg)
  got = draws.draw_priors(module, params, cfg, info, blocks, real)
  fwd = jax.jit(lambda p, x: taps.apply_with_attention(module, {"params": p}, x)[1])
  for i in range(5):
    attns = fwd(params, real[i % 3][None])
    for prior, l in zip(got, blocks):
      row = np.asarray(attns[l], np.float64)[0, :, 0, 1:]
      np.testing.assert_allclose(prior[i], row / row.sum(-1, keepdims=True), atol=1e-5)
