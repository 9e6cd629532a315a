"""The synthesis loop end to end on tiny models: outputs, devices, resume, NaN guard."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from spdfq_jax import synth
from spdfq_jax.models import zoo
from spdfq_jax.synth import smi

sys.path.insert(0, os.path.dirname(__file__))
import synth_child  # noqa: E402

CHILD = os.path.join(os.path.dirname(__file__), "synth_child.py")


def _child_env(devices=1, cache=None):
  env = dict(os.environ)
  if cache:  # lets a restarted child reuse the first one's compiled step
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _load(workdir):
  return synth.load_result(os.path.join(workdir, "synthetic", "result.npz"))


def _generate(overrides: dict, workdir: str):
  module = synth_child.tiny_vit()
  o = dict(overrides)
  return synth_child.generate(module, synth_child.tiny_params(module),
                              synth_child.tiny_config(o.pop("method", "spdfq"), **o),
                              workdir=workdir, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Uninterrupted single-device SPDFQ run of the child's config, in this process."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  return workdir, _generate({}, workdir)


@pytest.fixture(scope="module")
def smi_reference(tmp_path_factory):
  """The same for SMI (tokens pruned at steps 3, 6 and 9)."""
  workdir = str(tmp_path_factory.mktemp("smi_ref"))
  return workdir, _generate(synth_child.SMI, workdir)


@pytest.fixture(scope="module")
def v2_reference(tmp_path_factory):
  """The same for PSAQ-ViT V2 (its student's weights and Adam state are checkpointed too)."""
  workdir = str(tmp_path_factory.mktemp("v2_ref"))
  return workdir, _generate(synth_child.PSAQ_V2, workdir)


@pytest.fixture(scope="module")
def mimiq_reference(tmp_path_factory):
  """The same for MimiQ (its noise and colour draws keyed by step and image index)."""
  workdir = str(tmp_path_factory.mktemp("mimiq_ref"))
  return workdir, _generate(synth_child.MIMIQ, workdir)


# Each method's reference run and its child overrides (JSON).
METHODS = {"spdfq": ("reference", {}), "smi": ("smi_reference", synth_child.SMI),
           "psaq_v2": ("v2_reference", synth_child.PSAQ_V2),
           "mimiq": ("mimiq_reference", synth_child.MIMIQ)}
# SPDFQ in the default suite, the other methods in the slow tier (./run test-slow).
ONE_FAST = [m if m == "spdfq" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]


def test_outputs(reference):
  workdir, r = reference
  d = os.path.join(workdir, "synthetic")
  for f in ("result.npz", "config.json", "grid.png", "attention.png"):
    assert os.path.exists(os.path.join(d, f)), f
  cfg = synth_child.tiny_config()
  lo = (0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  hi = (1 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  assert r.images.shape == (5, 16, 16, 3)
  assert (r.images >= lo - 1e-6).all() and (r.images <= hi + 1e-6).all()
  noise = synth.generate(synth_child.tiny_vit(), synth_child.tiny_params(synth_child.tiny_vit()),
                         synth_child.tiny_config("noise"), progress=False)
  assert not np.allclose(r.images, noise.images)  # the loop moved the pixels
  np.testing.assert_allclose(r.targets.sum(-1), 1.0, rtol=1e-5)
  assert r.targets.max(-1).min() < 1.0  # soft labels
  assert r.region_targets.shape == (5, 4, 10)
  # Deep half of 2 blocks = block 1 (1-based l=2 >= 1) and block 0 (l=1 >= 1).
  assert r.apa_blocks == (0, 1) and r.priors[0].shape == (5, 2, 16)
  with open(os.path.join(d, "config.json")) as f:
    assert json.load(f)["method"] == "spdfq"
  again = synth.generate(synth_child.tiny_vit(), None, synth_child.tiny_config(), workdir=workdir)
  np.testing.assert_array_equal(again.images, r.images)  # finished run is loaded, not redone
  with pytest.raises(ValueError, match="another config"):
    synth.generate(synth_child.tiny_vit(), None, synth_child.tiny_config(seed=1), workdir=workdir)


@pytest.mark.parametrize("method", ONE_FAST)
def test_four_devices_padded_batch_equals_one_device(method, request, tmp_path):
  fixture, overrides = METHODS[method]
  _, ref = request.getfixturevalue(fixture)
  arg = json.dumps(overrides)
  out = subprocess.run([sys.executable, CHILD, str(tmp_path), arg], env=_child_env(4),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "devices 4" in out.stdout  # 5 images on 4 devices: padded to 8
  got = _load(str(tmp_path))
  np.testing.assert_allclose(got.images, ref.images, atol=2e-4)
  if method == "smi":
    np.testing.assert_array_equal(got.kept_patches, ref.kept_patches)


@pytest.mark.parametrize("method", ONE_FAST)
def test_killed_run_resumes_to_the_same_images(method, request, tmp_path):
  fixture, overrides = METHODS[method]
  _, ref = request.getfixturevalue(fixture)
  arg = json.dumps(overrides)
  ckpt = tmp_path / "synthetic" / "checkpoints"
  env = _child_env(cache=tmp_path / "jax_cache")
  proc = subprocess.Popen([sys.executable, CHILD, str(tmp_path), arg, "0.5"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir()):
        break
      time.sleep(0.1)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not (tmp_path / "synthetic" / "result.npz").exists()
  steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()]
  assert steps and max(steps) < 12
  out = subprocess.run([sys.executable, CHILD, str(tmp_path), arg], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  got = _load(str(tmp_path))
  np.testing.assert_allclose(got.images, ref.images, atol=1e-5)
  if method == "smi":
    np.testing.assert_array_equal(got.kept_patches, ref.kept_patches)


def test_nan_loss_names_step_and_term():
  """PSAQ-ViT loop on a model whose head is NaN: the error names step, term, other terms."""
  module = synth_child.tiny_vit()
  params = synth_child.tiny_params(module)
  params["head"]["bias"] = params["head"]["bias"] * np.nan
  cfg = synth_child.tiny_config("psaq", iterations=2)
  with pytest.raises(FloatingPointError, match=r"step 0: ce=nan") as err:
    synth.generate(module, params, cfg, progress=False)
  assert "'entropy'" in str(err.value) and "'tv'" in str(err.value)


def test_swin_spdfq(tmp_path):
  module = zoo.custom_swin(num_classes=10, img_size=16, patch_size=2, embed_dim=8, depths=(2, 2),
                           num_heads=(2, 4), window_size=4)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  cfg = synth.default_config("spdfq", "swin")
  assert cfg.lr == 0.25
  cfg.update(num_images=3, iterations=4, warmup=1)
  r = synth.generate(module, params, cfg, workdir=str(tmp_path), progress=False)
  assert r.apa_blocks == (1, 2, 3)  # L = 4: l = 2, 3, 4
  assert [p.shape for p in r.priors] == [(3, 2, 16), (3, 4, 16), (3, 4, 16)]
  assert os.path.exists(tmp_path / "synthetic" / "attention.png")


def test_smi_outputs(smi_reference):
  """SMI's set: the final mask keeps int(17 * 0.7^3) = 5 of the 16 patches per image (the
  reference counts the class token in), the others are exactly zero, and the file keeps
  which ones."""
  workdir, r = smi_reference
  assert r.kept_patches.shape == (5, 5)
  assert (np.diff(r.kept_patches, axis=1) > 0).all()  # ascending, as calibration finds them
  nonzero = smi.nonzero_patches(r.images, 4)
  for i in range(5):
    np.testing.assert_array_equal(np.flatnonzero(nonzero[i]), r.kept_patches[i])
  np.testing.assert_array_equal(_load(workdir).kept_patches, r.kept_patches)
  assert r.classes.shape == (5,) and r.targets.max(-1).min() == 1.0  # hard labels
  assert 0 <= r.diagnostics["kept_class_fit"] <= 1


def test_mimiq_outputs(mimiq_reference):
  """MimiQ's set: hard labels, every image in the pixel range and moved from its start."""
  workdir, r = mimiq_reference
  cfg = synth_child.tiny_config(**synth_child.MIMIQ)
  lo = (0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  hi = (1 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  assert r.images.shape == (5, 16, 16, 3) and r.targets.max(-1).min() == 1.0
  assert (r.images >= lo - 1e-6).all() and (r.images <= hi + 1e-6).all()
  noise = synth.generate(synth_child.tiny_vit(), synth_child.tiny_params(synth_child.tiny_vit()),
                         synth_child.tiny_config("noise"), progress=False)
  assert np.abs(r.images - np.clip(noise.images, lo, hi)).mean() > 0.05
  np.testing.assert_array_equal(_load(workdir).images, r.images)


def test_swin_mimiq():
  """MimiQ on a Swin: the heads are compared per window, on the window grid."""
  module = zoo.custom_swin(num_classes=10, img_size=16, patch_size=2, embed_dim=8, depths=(2, 2),
                           num_heads=(2, 4), window_size=4)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  cfg = synth.default_config("mimiq", "swin")
  cfg.update(num_images=3, iterations=4)
  seen = []
  r = synth.generate(module, params, cfg, progress=False, callback=lambda s, t: seen.append(t))
  assert r.images.shape == (3, 16, 16, 3) and len(seen) == 4
  assert all(0 < t["ssim"] < 1 and np.isfinite(t["ce"]) for t in seen)
