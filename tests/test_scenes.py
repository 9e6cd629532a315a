"""The scenes test bed's generator: deterministic, the item where the box says, right labels."""
import numpy as np
import pytest

from spdfq_jax.data import fashion_mnist, scenes


@pytest.fixture(scope="module")
def train_items():
  return fashion_mnist.load_raw("train")


def test_same_seed_same_scenes_and_subsets_agree(train_items):
  items, _ = train_items
  a, box_a = scenes.make(items, 3, "train", np.arange(20))
  b, box_b = scenes.make(items, 3, "train", np.arange(20))
  assert a.tobytes() == b.tobytes() and np.array_equal(box_a, box_b)
  sub, box_sub = scenes.make(items, 3, "train", np.array([17, 4]))
  assert np.array_equal(sub, a[[17, 4]]) and np.array_equal(box_sub, box_a[[17, 4]])
  other, _ = scenes.make(items, 4, "train", np.arange(20))
  assert (other != a).mean() > 0.5  # a new seed is a new draw (training epochs)


def test_splits_draw_apart(train_items):
  """Test scenes are drawn under their own stream: the same items and seed, placed as a
  test split, land elsewhere than as a training split."""
  items, _ = train_items
  _, box_test = scenes.make(items, 0, "test", np.arange(10))
  _, box_train = scenes.make(items, 0, "train", np.arange(10))
  assert (box_test != box_train).any(axis=1).mean() > 0.5


def test_item_is_pasted_inside_its_box_and_canvas(train_items):
  """Oracle: the same scene with the item blanked out (all draws are unchanged, since no
  draw depends on the item's pixels); the pixels that differ are the item's."""
  items, _ = train_items
  for i in range(12):
    blank = items.copy()
    blank[i] = 0
    with_item, box = scenes.scene(items, i, 0, "train")
    without, box_blank = scenes.scene(blank, i, 0, "train")
    top, left, bottom, right = box
    assert 0 <= top < bottom <= scenes.IMG_SIZE and 0 <= left < right <= scenes.IMG_SIZE
    diff = np.abs(with_item.astype(int) - without.astype(int)).max(-1)
    rows, cols = np.nonzero(diff > 40)
    assert len(rows) > 30
    # The strongly changed pixels lie in the box, up to the 1-pixel soft edge.
    assert rows.min() >= top - 1 and rows.max() <= bottom and cols.min() >= left - 1
    assert cols.max() <= right
    # ... and they fill it: the box is not larger than the item.
    assert rows.min() <= top + 1 and rows.max() >= bottom - 2
    assert cols.min() <= left + 1 and cols.max() >= right - 2
    # A blank item has no opaque pixel: its box falls back to the placement square, which
    # holds the item's box.
    assert box_blank[0] <= top and box_blank[1] <= left
    assert box_blank[2] >= bottom and box_blank[3] >= right


def test_labels_are_the_items_classes():
  items, labels = fashion_mnist.load_raw("test")
  idx = np.array([0, 5, 123, 9999])
  images, got, boxes = scenes.load_with_boxes("test", indices=idx)
  assert np.array_equal(got, labels[idx])
  assert images.shape == (4, 48, 48, 3) and images.dtype == np.uint8 and boxes.shape == (4, 4)
  ref, ref_boxes = scenes.make(items, scenes.TEST_SEED, "test", idx)
  assert np.array_equal(images, ref) and np.array_equal(boxes, ref_boxes)


def test_cache_round_trip(tmp_path, monkeypatch):
  items, labels = fashion_mnist.load_raw("test")
  small = (items[:30], labels[:30])
  monkeypatch.setattr(fashion_mnist, "load_raw", lambda split, data_dir=None: small)
  first = scenes.load_with_boxes("test", cache_dir=str(tmp_path))
  assert (tmp_path / "scenes-test-0.npz").exists()
  monkeypatch.setattr(scenes, "make", lambda *a, **k: pytest.fail("cache not used"))
  second = scenes.load_with_boxes("test", cache_dir=str(tmp_path))
  for a, b in zip(first, second):
    assert np.array_equal(a, b)


def test_normalisation_constants_match_the_training_scenes(train_items):
  """MEAN/STD were measured on 10k training scenes; 1000 of them agree to 0.01."""
  items, _ = train_items
  x, _ = scenes.make(items, 0, "train", np.arange(0, 10000, 10))
  f = x.astype(np.float64) / 255
  np.testing.assert_allclose(f.mean((0, 1, 2)), scenes.MEAN, atol=0.01)
  np.testing.assert_allclose(f.std((0, 1, 2)), scenes.STD, atol=0.01)
  low, high = scenes.pixel_range()
  np.testing.assert_allclose(scenes.normalise(np.zeros((1, 1, 1, 3), np.uint8))[0, 0, 0], low)
  np.testing.assert_allclose(scenes.normalise(np.full((1, 1, 1, 3), 255, np.uint8))[0, 0, 0],
                             high, rtol=1e-6)


def test_training_draws_fresh_scenes_of_the_same_items():
  """Each epoch is new scenes (the augmentation) of the same items and labels."""
  import importlib.util, os  # pylint: disable=g-import-not-at-top,multiple-imports
  from spdfq_jax.tools import train_fp  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("scenes_train",
                                                os.path.join(root, "configs", "scenes_train.py"))
  cfg_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_module)
  config = cfg_module.get_config("vit")
  config.train_examples, config.test_examples = 16, 8
  data = train_fp.TrainData(config)
  e0, e1 = data.epoch(0), data.epoch(1)
  assert e0.shape == (16, 48, 48, 3) and data.image_shape == (48, 48, 3) and len(data) == 16
  np.testing.assert_array_equal(e0, data.epoch(0))
  assert np.abs(e0 - e1).mean() > 0.3
  items, labels = fashion_mnist.load_raw("train")
  np.testing.assert_array_equal(data.train_y, labels[:16])
  np.testing.assert_array_equal(e1, scenes.normalise(scenes.make(items[:16], 2, "train")[0]))
  assert data.preprocessing().mean == scenes.MEAN and data.name() == "scenes"


@pytest.mark.slow
def test_asset_loads_by_name_and_reproduces_its_recorded_accuracy():
  from spdfq_jax import evaluate, models  # pylint: disable=g-import-not-at-top
  from spdfq_jax.models import native  # pylint: disable=g-import-not-at-top
  module, params = models.load("scenes_vit")[:2]
  meta = native.read_metadata(models.convert.resolve("scenes_vit", None))
  assert meta["dataset"] == "scenes" and meta["test_count"] == 10000
  assert tuple(meta["preprocessing"]["mean"]) == scenes.MEAN and module.img_size == 48
  # The card's slice (first 2000 test scenes, recorded beside the full 10k figure) keeps
  # the suite short.
  n = meta["test_slice"]["first"]
  images, y, _ = scenes.load_with_boxes("test", indices=np.arange(n))
  x = scenes.normalise(images)
  result = evaluate.evaluate(lambda im: module.apply({"params": params}, im),
                             evaluate.batches_from_arrays(x, y, 500), 500, total=n)
  assert result["count"] == n == 2000
  assert abs(result["top1"] - meta["test_slice"]["top1"]) <= 0.05


@pytest.mark.slow
def test_pipeline_runs_on_the_scenes_bed(tmp_path):
  """main with configs/scenes_compare.py (cut down): the scenes data reach synthesis,
  calibration and evaluation; the real row calibrates on `scenes.calibration_images`."""
  import importlib.util, os  # pylint: disable=g-import-not-at-top,multiple-imports
  from spdfq_jax import main  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "scenes_compare", os.path.join(root, "configs", "scenes_compare.py"))
  cfg_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_module)
  c = cfg_module.get_config()
  c.unlock()
  c.methods, c.bits, c.num_images, c.export = "psaq,real", "w4a4", 4, False
  c.synth.iterations, c.synth.warmup = 2, 1
  c.quant.recon.iters = 0
  c.eval.limit, c.eval.batch_size = 40, 20
  out = main.run(c, str(tmp_path), main.default_stages())
  assert [r["method"] for r in out["rows"]] == ["psaq", "real"]
  assert all(r["eval_count"] == 40 for r in out["rows"])
  dirs = {d.split("-")[0]: d for d in os.listdir(tmp_path / "synthetic")}
  real = np.load(tmp_path / "synthetic" / dirs["real"] / main.SET_FILE)["images"]
  np.testing.assert_array_equal(real, scenes.calibration_images(4, c.seed)[0])
  psaq = np.load(tmp_path / "synthetic" / dirs["psaq"] / main.SET_FILE)["images"]
  assert psaq.shape == (4, 48, 48, 3) and np.isfinite(psaq).all()
