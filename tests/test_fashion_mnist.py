"""Fashion-MNIST test bed: data module, training smoke test, committed FP checkpoints."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdfq_jax import evaluate
from spdfq_jax.data import fashion_mnist
from spdfq_jax.models import native
from spdfq_jax.tools import train_fp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "spdfq_jax", "assets")
_spec = importlib.util.spec_from_file_location(
    "fmnist_train", os.path.join(ROOT, "configs", "fmnist_train.py"))
fmnist_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_train)
HAVE_DATA = all(os.path.exists(os.path.join(fashion_mnist.DEFAULT_DIR, f))
                for pair in fashion_mnist._FILES.values() for f in pair)
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason="apt-get install dataset-fashion-mnist")


@needs_data
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_shapes_dtypes_labels(split, n):
  x, y = fashion_mnist.load(split)
  assert x.shape == (n, 32, 32, 1) and x.dtype == np.float32
  assert y.shape == (n,) and y.dtype == np.int32
  assert y.min() == 0 and y.max() == 9
  assert np.all(np.bincount(y, minlength=10) == n // 10)  # balanced classes
  lo, hi = fashion_mnist.pixel_range()
  assert x.min() == pytest.approx(lo, abs=1e-5) and x.max() == pytest.approx(hi, abs=1e-5)
  assert np.all(x[:, :2] == x[0, 0, 0, 0])  # zero padding sits at the normalised 0


@needs_data
def test_three_channels_replicate():
  x1, _ = fashion_mnist.load("test")
  x3, _ = fashion_mnist.load("test", channels=3)
  assert x3.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(x3, np.repeat(x1, 3, axis=-1))


@needs_data
def test_normalisation_constants_are_train_statistics():
  raw, _ = fashion_mnist.load_raw("train")
  pixels = raw.astype(np.float64) / 255.0
  assert pixels.mean() == pytest.approx(fashion_mnist.MEAN, abs=1e-6)
  assert pixels.std() == pytest.approx(fashion_mnist.STD, abs=1e-6)
  x, _ = fashion_mnist.load("train")
  inner = x[:, 2:30, 2:30].astype(np.float64)  # the original 28x28 pixels
  assert inner.mean() == pytest.approx(0.0, abs=1e-4)
  assert inner.std() == pytest.approx(1.0, abs=1e-4)
  pre = fashion_mnist.preprocessing(3)
  assert pre.input_size == 32 and pre.mean == (fashion_mnist.MEAN,) * 3


def test_missing_directory_names_package_and_directory(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as err:
    fashion_mnist.load("test", data_dir=missing)
  assert "apt-get install dataset-fashion-mnist" in str(err.value)
  assert missing in str(err.value)


def _tiny_config(**overrides):
  c = fmnist_train.get_config("vit")
  c.unlock()
  c.model = dict(img_size=32, patch_size=8, width=16, depth=1, num_heads=2, num_classes=10)
  c.batch_size, c.epochs, c.warmup_steps, c.lr = 32, 1, 2, 3e-3
  c.train_examples, c.test_examples = 512, 100
  c.eval_every_epoch, c.ckpt_every_steps = False, 1000
  c.flip, c.crop_pad = True, 4
  c.update(overrides)
  c.lock()
  return c


@needs_data
def test_train_step_lowers_loss():
  config = _tiny_config()
  module = train_fp.build_model(config)
  x, y = fashion_mnist.load("test")
  x, y = jnp.asarray(x[:32]), jnp.asarray(y[:32])
  params = module.init(jax.random.PRNGKey(0), x[:1])["params"]
  tx = train_fp.optimizer(config, 100)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.asarray(0, jnp.int32),
           "seconds": jnp.asarray(0.0, jnp.float32)}
  step = jax.jit(train_fp.make_train_step(module, tx, config))
  losses = []
  for _ in range(25):
    state, loss = step(state, x, y, jax.random.PRNGKey(1))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_augment_keeps_shape_and_fill():
  x = jnp.ones((4, 32, 32, 1))
  y = train_fp.augment(jax.random.PRNGKey(0), x, True, 4, -7.0)
  assert y.shape == x.shape
  assert set(np.unique(np.asarray(y))) <= {1.0, -7.0}


@needs_data
def test_resume_gives_identical_params(tmp_path):
  _, full, _ = train_fp.train(_tiny_config(max_steps=6), str(tmp_path / "full"))
  train_fp.train(_tiny_config(max_steps=3), str(tmp_path / "split"))
  _, resumed, result = train_fp.train(_tiny_config(max_steps=6), str(tmp_path / "split"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, full, resumed)
  module, params, meta = native.load(str(tmp_path / "split" / "model.safetensors"))
  assert meta["train_steps"] == 6 and meta["test_top1"] == pytest.approx(result["top1"])
  assert meta["preprocessing"]["mean"] == [fashion_mnist.MEAN]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                         jax.tree_util.tree_map(np.asarray, resumed))


def _asset(name):
  path = os.path.abspath(os.path.join(ASSETS, f"{name}.safetensors"))
  if not os.path.exists(path):
    pytest.skip(f"{path} not built yet (configs/fmnist_train.py)")
  return path


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("name", ["fmnist_vit", "fmnist_swin"])
def test_committed_checkpoint_reproduces_recorded_accuracy(name):
  module, params, meta = native.load(_asset(name))
  assert meta["dataset"] == "fashion_mnist" and meta["test_count"] == 10000
  channels = len(meta["preprocessing"]["mean"])
  x, y = fashion_mnist.load("test", channels=channels)
  result = evaluate.evaluate(lambda im: module.apply({"params": params}, im),
                             evaluate.batches_from_arrays(x, y, 500), 500, total=len(x))
  assert result["count"] == 10000
  assert abs(result["top1"] - meta["test_top1"]) <= 0.05


@pytest.mark.parametrize("name", ["fmnist_vit", "fmnist_swin"])
def test_committed_checkpoint_loads_by_name(name):
  path = _asset(name)
  from spdfq_jax import models  # pylint: disable=g-import-not-at-top
  if not hasattr(models, "load"):
    pytest.skip("spdfq_jax.models.load not available")
  module, params = models.load(name)[:2]
  ref_module, ref_params, _ = native.load(path)
  assert native.describe(module) == native.describe(ref_module)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, params),
                         ref_params)
