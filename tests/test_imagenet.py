"""ImageNet data: exact eval transform, image-folder and TFDS sources, masked last batch."""
import math
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from spdfq_jax import evaluate
from spdfq_jax.data import imagenet
from spdfq_jax.models import zoo

WNIDS = ("n01440764", "n01443537", "n01484850")  # labels 0, 1, 2


def _write_folder(root, split, per_class=(3, 2, 2), sizes=((300, 200), (180, 260), (256, 256))):
  for c, (wnid, n) in enumerate(zip(WNIDS, per_class)):
    os.makedirs(root / split / wnid, exist_ok=True)
    for i in range(n):
      w, h = sizes[(c + i) % len(sizes)]
      Image.new("RGB", (w, h), (40 + 80 * c, 0, 0)).save(root / split / wnid / f"img_{i}.JPEG",
                                                          quality=100)


def test_transform_matches_the_timm_recipe():
  pre = zoo.entry("deit_small_patch16_224").preprocessing
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (200, 300, 3), np.uint8)
  image = Image.fromarray(pixels)
  x = imagenet.transform(image, pre)
  assert x.shape == (224, 224, 3) and x.dtype == np.float32
  size = math.floor(224 / 0.875)  # 256: shorter side
  resized = image.resize((int(size * 300 / 200), size), Image.BICUBIC)
  top, left = round((size - 224) / 2), round((resized.size[0] - 224) / 2)
  ref = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255
  ref = (ref - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
  np.testing.assert_allclose(x, ref, atol=1e-6)
  vit = zoo.entry("vit_base_patch16_224").preprocessing
  assert imagenet.resize_size(vit) == 248
  grey = imagenet.transform(Image.new("RGB", (250, 250), (255, 255, 255)), vit)
  np.testing.assert_allclose(grey, 1.0, atol=1e-6)  # (1 - 0.5) / 0.5


def _colour_logits(images):
  """Class c was drawn with red = 40 + 80c; recover it from the (ViT-normalised) red mean."""
  red = images[..., 0].mean(axis=(1, 2)) * 0.5 + 0.5
  c = jnp.round((red * 255 - 40) / 80)
  return -jnp.abs(jnp.arange(1000)[None] - c[:, None]).astype(jnp.float32)


def test_folder_source_and_masked_last_batch(tmp_path):
  _write_folder(tmp_path, "val")
  pre = zoo.entry("vit_small_patch16_224").preprocessing
  src = imagenet.source(str(tmp_path), "validation")
  assert len(src) == 7
  labels = [y for _, y in src.items(0, len(src))]
  assert labels == [0, 0, 0, 1, 1, 2, 2]
  batches = list(imagenet.batches(src, pre, 4, workers=2))
  assert [b[0].shape for b in batches] == [(4, 224, 224, 3), (3, 224, 224, 3)]
  result = evaluate.evaluate(_colour_logits, imagenet.batches(src, pre, 4), 4, total=len(src))
  assert result["count"] == 7  # padding of the last batch is masked out
  assert result["top1"] == pytest.approx(100.0)
  # Each of 3 processes reads its own contiguous share; together, the set once, in order.
  shares = [list(imagenet.batches(src, pre, 2, workers=2, process_index=i, process_count=3))
            for i in range(3)]
  assert [[len(y) for _, y in share] for share in shares] == [[2, 1], [2], [2]]
  np.testing.assert_array_equal(np.concatenate([x for share in shares for x, _ in share]),
                                np.concatenate([x for x, _ in batches]))
  # The folder itself may be the split directory.
  assert len(imagenet.source(str(tmp_path / "val"))) == 7
  assert len(imagenet.source(str(tmp_path), limit=5)) == 5


def test_wnid_subset_keeps_imagenet_labels(tmp_path):
  os.makedirs(tmp_path / "val" / "n15075141")
  Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n15075141" / "a.JPEG")
  src = imagenet.source(str(tmp_path))
  assert [y for _, y in src.items(0, len(src))] == [999]


def test_tfds_mock(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  pre = zoo.entry("deit_tiny_patch16_224").preprocessing
  # The mock generates 7 examples per split but records no split sizes (a prepared
  # dataset does), and ignores slices: give it the sizes; shares are tested on folders.
  sizes = {s: types.SimpleNamespace(num_examples=7, num_bytes=0) for s in ("validation", "train")}
  monkeypatch.setattr(tfds.core.DatasetInfo, "splits", property(lambda self: sizes))
  with tfds.testing.mock_data(num_examples=7):
    src = imagenet.source(str(tmp_path), "validation", kind="tfds")
    result = evaluate.evaluate(lambda x: jnp.zeros((x.shape[0], 1000)).at[:, 3].set(1.0),
                               imagenet.batches(src, pre, 3, workers=2), 3)
    assert result["count"] == 7
    for images, labels in imagenet.batches(src, pre, 3):
      assert images.shape[1:] == (224, 224, 3) and labels.dtype == np.int32
      assert ((labels >= 0) & (labels < 1000)).all()
    x, y = imagenet.calibration_images(str(tmp_path), pre, 4, seed=1, kind="tfds")
    assert x.shape == (4, 224, 224, 3) and y.shape == (4,)


def test_missing_data_says_what_to_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_val.tar"):
    imagenet.source(str(tmp_path / "nowhere"), "validation", kind="folder")
  with pytest.raises(FileNotFoundError, match=r"downloads/manual"):
    imagenet.source(str(tmp_path), "validation", kind="tfds")


def test_calibration_from_train_folder(tmp_path):
  _write_folder(tmp_path, "train", per_class=(4, 4, 4))
  pre = zoo.entry("swin_small_patch4_window7_224").preprocessing
  x1, y1 = imagenet.calibration_images(str(tmp_path), pre, 5, seed=3)
  x2, y2 = imagenet.calibration_images(str(tmp_path), pre, 5, seed=3)
  assert x1.shape == (5, 224, 224, 3)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  with pytest.raises(ValueError, match="fewer"):
    imagenet.calibration_images(str(tmp_path), pre, 50)
