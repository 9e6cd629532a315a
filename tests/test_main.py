"""Pipeline wiring: stage skipping and resumption, rows, reports (stages faked, data real)."""
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from spdfq_jax import main, pipeline
from spdfq_jax import rows as rows_lib
from spdfq_jax import workdir as workdir_lib
from spdfq_jax.data import fashion_mnist
from spdfq_jax.models import zoo
from spdfq_jax.synth import config as synth_config
from spdfq_jax.quant import config as quant_config

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
    reason="needs the Fashion-MNIST IDX files")

TINY = dict(img_size=32, patch_size=8, width=16, depth=2, num_heads=2, num_classes=10)


@functools.lru_cache(None)
def _tiny_model():
  module = zoo.custom_vit(**TINY)
  init = jax.jit(module.init)
  return module, init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32))["params"]


@functools.lru_cache(None)
def _jit_apply():
  return jax.jit(_tiny_model()[0].apply)


class Killed(Exception):
  pass


class FakeStages:
  """Stage functions with the real signatures; quantize can be 'killed' once midway."""

  def __init__(self, kill_quantize=False):
    self.calls = {"generate": 0, "quantize": 0, "export": 0}
    self.kill_quantize = kill_quantize

  def stages(self):
    return main.Stages(self.load_model, synth_config.default_config, self.generate,
                       quant_config.default_config, self.quantize, self.export)

  def load_model(self, name, path=None):
    return _tiny_model()

  def generate(self, module, params, cfg, workdir=None):
    self.calls["generate"] += 1
    path = os.path.join(workdir, "synthetic", "result.npz")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      rng = np.random.default_rng(cfg.seed)
      np.savez(path, images=rng.normal(size=(cfg.num_images, 32, 32, 1)).astype(np.float32))
    class R:
      images = np.load(path)["images"]
      diagnostics = {"class_fit": 0.75, "prior_fit": 0.25, "prior_fit_chance": 0.01}
    return R

  def quantize(self, module, params, images, cfg, workdir=None):
    """'Reconstruction' in two halves with a checkpoint between them, like the real loop."""
    self.calls["quantize"] += 1
    os.makedirs(workdir, exist_ok=True)
    marker = os.path.join(workdir, "half.json")
    if not os.path.exists(marker):
      with open(marker, "w") as f:
        json.dump({"scale": 1.0 + cfg.weights.bits}, f)
      if self.kill_quantize:
        raise Killed()
    scale = json.load(open(marker))["scale"]
    apply = _jit_apply()
    class Q:
      timings = {"calibrate": 0.1, "reconstruct": 0.2}
      variables = {"params": params}
      def logits(self, x):
        return apply({"params": params}, x) * scale
    return Q()

  def export(self, path, qmodel):
    self.calls["export"] += 1
    open(path, "w").write("q")


def _config(methods="spdfq", bits=""):
  from configs import fmnist_w4a4
  c = fmnist_w4a4.get_config()
  c.unlock()
  c.methods, c.bits = methods, bits
  c.eval.limit = 23  # not a multiple of the batch
  c.eval.batch_size = 10
  c.num_images = 4
  return c


def _stable(report):
  keys = ("model", "method", "w_bits", "a_bits", "num_images", "fp_top1", "quant_top1",
          "fp_top5", "quant_top5")
  return [{k: r[k] for k in keys} for r in report["rows"]], {k: report[k] for k in keys}


def test_single_row_report_and_skip(tmp_path):
  fake = FakeStages()
  out = main.run(_config(), str(tmp_path), fake.stages(), config_name="fmnist_w4a4")
  data = json.load(open(tmp_path / "report.json"))
  for k in ("model", "method", "w_bits", "a_bits", "num_images", "fp_top1", "quant_top1",
            "fp_top5", "quant_top5", "device_kind", "device_count", "packages", "timings"):
    assert k in data, k
  assert data["method"] == "spdfq" and data["w_bits"] == 4 and data["num_images"] == 4
  assert data["rows"][0]["eval_count"] == 23 and data["fp_eval_count"] == 23
  assert {"synthesize", "quantize", "evaluate", "export", "reconstruct"} <= set(data["timings"])
  md = open(tmp_path / "report.md").read()
  assert "| fmnist_vit | spdfq | W4A4 | 4 |" in md
  # The synthesis' data-free fit travels into the row and the table.
  assert data["class_fit"] == 75.0 and data["prior_fit"] == 0.25
  assert "| class fit % | prior fit | chance |" in md and "| 75 | 0.250 | 0.010 |" in md
  assert fake.calls == {"generate": 1, "quantize": 1, "export": 1}
  # README's layout: the set lies in synthetic/<method>-<hash>/ itself.
  (synth_dir,) = os.listdir(tmp_path / "synthetic")
  assert synth_dir.startswith("spdfq-") and data["synth_dir"].endswith(synth_dir)
  assert sorted(os.listdir(tmp_path / "synthetic" / synth_dir)) == ["result.npz"]
  again = main.run(_config(), str(tmp_path), fake.stages())
  assert fake.calls == {"generate": 1, "quantize": 1, "export": 1}  # everything skipped
  assert _stable(again) == _stable(out)
  assert again["rows"][0]["timings"] == out["rows"][0]["timings"]


def test_killed_run_resumes_to_the_same_report(tmp_path):
  ref = main.run(_config(), str(tmp_path / "ref"), FakeStages().stages())
  fake = FakeStages(kill_quantize=True)
  with pytest.raises(Killed):
    main.run(_config(), str(tmp_path / "w"), fake.stages())
  assert not (tmp_path / "w" / "report.json").exists()
  fake.kill_quantize = False
  out = main.run(_config(), str(tmp_path / "w"), fake.stages())
  assert fake.calls["generate"] == 1 and fake.calls["quantize"] == 2  # the set is reused
  assert _stable(out) == _stable(ref)


def test_rows_and_overrides_get_their_own_directories(tmp_path):
  fake = FakeStages()
  out = main.run(_config("noise,spdfq", "w4a4,w3a3"), str(tmp_path), fake.stages())
  assert [(r["method"], r["w_bits"]) for r in out["rows"]] == [
      ("noise", 4), ("spdfq", 4), ("noise", 3), ("spdfq", 3)]
  assert fake.calls["generate"] == 2 and fake.calls["quantize"] == 4
  assert len(os.listdir(tmp_path / "synthetic")) == 2  # shared across bit settings
  c = _config()
  c.synth.iterations = 10
  main.run(c, str(tmp_path), fake.stages(), reuse_workdir=True)
  assert len(os.listdir(tmp_path / "synthetic")) == 3  # a changed setting never reuses


def test_real_row_reads_training_images(tmp_path):
  fake = FakeStages()
  out = main.run(_config("real"), str(tmp_path), fake.stages())
  assert fake.calls["generate"] == 0 and out["rows"][0]["num_images"] == 4
  (real_dir,) = os.listdir(tmp_path / "synthetic")
  assert real_dir.startswith("real-")
  assert os.path.exists(tmp_path / "synthetic" / real_dir / "grid.png")


def test_default_workdir_and_bits():
  assert (workdir_lib.default_workdir("configs/vit_base.py:w6a6")
          == os.path.join("workdirs", "vit_base_w6a6"))
  assert (workdir_lib.default_workdir("configs/fmnist_w4a4.py")
          == os.path.join("workdirs", "fmnist_w4a4"))
  assert rows_lib.parse_bits("w4a4, W3A3") == [(4, 4), (3, 3)]
  with pytest.raises(ValueError):
    rows_lib.parse_bits("4/4")


def test_new_weights_at_the_same_path_are_not_reused(tmp_path):
  ckpt = tmp_path / "model.safetensors"
  ckpt.write_bytes(b"a")
  c = _config()
  c.model.checkpoint = str(ckpt)
  scfg = lambda: pipeline.synth_plan(FakeStages().stages(), _tiny_model()[0], "spdfq", c,
                                     zoo.Preprocessing())[1]
  before = scfg()
  ckpt.write_bytes(b"bb")
  assert scfg() != before
  c.data.workers = 7
  assert workdir_lib.data_key(c) == workdir_lib.data_key(_config())


def _real_generate(steps, stop_at=None):
  """synth.generate as main calls it, recording each step; raises Killed after `stop_at`."""
  from spdfq_jax import synth

  def callback(step, terms):
    steps.append(step)
    if step == stop_at:
      raise Killed()

  def generate(module, params, cfg, workdir=None):
    return synth.generate(module, params, cfg, workdir=workdir, progress=False,
                          callback=callback)
  return generate


def test_older_nested_synthesis_dir_resumes(tmp_path):
  """Workdirs from before the flat layout hold the set in synthetic/<method>-<hash>/synthetic/
  (synth.generate's own subdirectory): an interrupted one resumes from its checkpoint, a
  finished one is reused, and both end in the flat layout."""
  c = _config("inversion")
  c.num_images = 2
  c.synth.iterations, c.synth.warmup, c.synth.checkpoint_every = 4, 1, 2
  steps = []
  stages = FakeStages().stages()
  stages.generate = _real_generate(steps)
  main.run(c, str(tmp_path / "ref"), stages)
  assert steps == [0, 1, 2, 3]
  (name,) = os.listdir(tmp_path / "ref" / "synthetic")
  flat = tmp_path / "ref" / "synthetic" / name
  assert (flat / "result.npz").exists() and (flat / "checkpoints").is_dir()
  assert not (flat / "synthetic").exists()
  want = np.load(flat / "result.npz")["images"]
  shutil.rmtree(tmp_path / "ref" / "rows")  # a finished flat set is read, not redone
  steps.clear()
  main.run(c, str(tmp_path / "ref"), stages)
  assert steps == []

  # What the previous main left after a kill at step 2: a checkpoint at step 2, nested.
  module, params = _tiny_model()
  scfg, name2 = pipeline.synth_plan(stages, module, "inversion", c,
                                    fashion_mnist.preprocessing(1))
  assert name2 == name
  old = tmp_path / "old" / "synthetic" / name
  with pytest.raises(Killed):
    _real_generate([], stop_at=2)(module, params, scfg, workdir=str(old))
  assert (old / "synthetic" / "checkpoints").is_dir()
  steps.clear()
  main.run(c, str(tmp_path / "old"), stages)
  assert steps == [2, 3]  # resumed, not restarted
  assert not (old / "synthetic").exists()
  np.testing.assert_allclose(np.load(old / "result.npz")["images"], want, atol=1e-6)

  # A finished nested set (rows gone) is read back, not recomputed.
  os.makedirs(old / "synthetic")
  for f in os.listdir(old):
    if f != "synthetic":
      os.replace(old / f, old / "synthetic" / f)
  shutil.rmtree(tmp_path / "old" / "rows")
  steps.clear()
  main.run(c, str(tmp_path / "old"), stages)
  assert steps == [] and (old / "result.npz").exists() and not (old / "synthetic").exists()
