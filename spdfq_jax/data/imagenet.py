"""ImageNet-1k: the validation set the accuracy table is measured on, and real training
images for the real-data reference row.

Two local sources, never a download:
- an image folder: `<dir>/val/<wnid>/*.JPEG` (and `<dir>/train/<wnid>/*.JPEG` for real
  calibration images). Class folders named by WordNet id get the standard index (position
  in the sorted list of the 1000 wnids, so a subset of classes keeps the right labels);
  other folder names get their position among the sorted folder names.
- TFDS `imagenet2012` in `data_dir`, prepared there from the manual-download tars in
  `<data_dir>/downloads/manual/` (or `manual_dir`) on first use.

The transform is the one the checkpoints were evaluated with (timm's eval transform):
PIL resize of the shorter side to floor(input_size / crop_pct) (bicubic for every model
of the paper), centre crop input_size, scale to [0, 1], normalise with mean/std. JPEGs
from TFDS are decoded by PIL too, so both sources give the same pixels.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from spdfq_jax import parallel
from spdfq_jax.models import zoo

TFDS_NAME = "imagenet2012"
NUM_CLASSES = 1000
VAL_SIZE = 50_000
MANUAL_TARS = {"validation": "ILSVRC2012_img_val.tar", "train": "ILSVRC2012_img_train.tar"}
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
_WNID = re.compile(r"^n\d{8}$")
_FOLDER_SPLITS = {"validation": ("val", "validation"), "train": ("train",)}
_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
                  "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


# ----------------------------------------------------------------------------- transform


def resize_size(pre: zoo.Preprocessing) -> int:
  """Shorter side before the centre crop: floor(input_size / crop_pct), as timm computes it."""
  return int(math.floor(pre.input_size / pre.crop_pct))


def transform(image: Image.Image, pre: zoo.Preprocessing) -> np.ndarray:
  """One PIL image -> float32 (input_size, input_size, 3), exactly timm's eval transform."""
  image = image.convert("RGB")
  w, h = image.size
  size = resize_size(pre)
  # torchvision Resize(int): shorter side -> size, longer side truncated to keep the aspect.
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), _INTERPOLATION[pre.interpolation])
  crop = pre.input_size
  top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
  image = image.crop((left, top, left + crop, top + crop))
  x = np.asarray(image, np.float32) / np.float32(255.0)
  return (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
  """A split as lazily loaded examples: `items(start, stop)` yields (raw, label) of examples
  [start, stop) and reads no others, `decode(raw)` -> PIL."""
  description: str
  num_examples: int
  items: Callable[[int, int], Iterable[tuple[Any, int]]]
  decode: Callable[[Any], Image.Image]
  num_classes: int = NUM_CLASSES  # size of the label space the labels index

  def __len__(self) -> int:
    return self.num_examples


def wnids() -> list[str]:
  """The 1000 ImageNet-1k WordNet ids in label order (the list TFDS ships)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def _missing_message(data_dir: str, split: str) -> str:
  folder = _FOLDER_SPLITS[split][0]
  tar = MANUAL_TARS[split]
  return (
      f"ImageNet {split} data not found under {data_dir!r}{_misnamed(data_dir, split)}. "
      "Provide one of:\n"
      f"  * an image folder: {os.path.join(data_dir, folder)}/<wnid>/*.JPEG (class folders "
      "named n01440764 ... n15075141; for the validation set sort the 50,000 images of "
      "ILSVRC2012_img_val.tar into class folders, e.g. with the widely used valprep.sh);\n"
      f"  * the original archive {tar} from https://image-net.org/download-images placed in "
      f"{os.path.join(data_dir, 'downloads', 'manual')}/ (or data.manual_dir): TFDS prepares "
      f"'{TFDS_NAME}' in {data_dir} from it on first use, without any download.\n"
      "Set the directory with --config.data.dir=...")


def _misnamed(data_dir: str, split: str) -> str:
  """' (its class folders a, b, ... are not named by WordNet id)' when that is the reason."""
  for name in _FOLDER_SPLITS[split]:
    path = os.path.join(data_dir, name)
    if os.path.isdir(path) and _class_dirs(path):
      shown = ", ".join(_class_dirs(path)[:3])
      return f" (the class folders of {path}, {shown} ..., are not named by WordNet id)"
  return ""


def _class_dirs(split_dir: str) -> list[str]:
  return sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))


def find_folder(data_dir: str, split: str = "validation") -> Optional[str]:
  """The class-folder directory of a split (`<dir>/val`, or `<dir>` itself), or None."""
  candidates = [os.path.join(data_dir, name) for name in _FOLDER_SPLITS[split]]
  if split == "validation":
    candidates.append(data_dir)
  for path in candidates:
    if os.path.isdir(path) and any(_WNID.match(d) for d in _class_dirs(path)):
      return path
  return None


def folder_source(split_dir: str) -> Source:
  """Every image under `split_dir/<class>/`, in sorted (class, file) order."""
  classes = _class_dirs(split_dir)
  if not classes:
    raise FileNotFoundError(f"no class folders in {split_dir}")
  if all(_WNID.match(c) for c in classes):
    index = {w: i for i, w in enumerate(wnids())}
    unknown = [c for c in classes if c not in index]
    if unknown:
      raise ValueError(f"{split_dir}: folders {unknown[:5]} are not ImageNet-1k classes")
    labels, num_classes = [index[c] for c in classes], NUM_CLASSES
  else:
    labels, num_classes = list(range(len(classes))), len(classes)
  examples = []
  for cls, label in zip(classes, labels):
    files = sorted(f for f in os.listdir(os.path.join(split_dir, cls))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    examples += [(os.path.join(split_dir, cls, f), label) for f in files]
  if not examples:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
  return Source(f"folder {split_dir}", len(examples),
                lambda start, stop: iter(examples[start:stop]), _open_file, num_classes)


def _open_file(path: str) -> Image.Image:
  with Image.open(path) as image:
    image.load()
    return image


def _open_bytes(data: bytes) -> Image.Image:
  import io  # pylint: disable=g-import-not-at-top
  return _open_file(io.BytesIO(data))  # type: ignore[arg-type]


def _tfds_builder(data_dir: str, split: str, manual_dir: Optional[str]):
  """The imagenet2012 builder, prepared from the manual tars if it is not yet."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = manual_dir or os.path.join(data_dir, "downloads", "manual")
  if os.path.exists(os.path.join(manual_dir, MANUAL_TARS[split])):
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=config)
  return builder


def tfds_source(data_dir: str, split: str = "validation", *, manual_dir: Optional[str] = None,
                start: int = 0, limit: Optional[int] = None) -> Source:
  """Examples [start, start + limit) of a TFDS imagenet2012 split, JPEG bytes decoded by PIL."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(data_dir, split, manual_dir)
  try:
    available = builder.info.splits[split].num_examples
  except KeyError:
    available = 0
  end = available if limit is None else min(available, start + limit)

  def dataset(lo: int, hi: int):
    """Examples [lo, hi) of the split: TFDS reads only the files that hold them."""
    spec = split if (lo, hi) == (0, available) else f"{split}[{lo}:{hi}]"
    try:
      ds = builder.as_dataset(split=spec, shuffle_files=False,
                              decoders={"image": tfds.decode.SkipDecoding()})
    except (AssertionError, FileNotFoundError, ValueError) as e:
      raise FileNotFoundError(_missing_message(data_dir, split)) from e
    return spec, ds.map(lambda ex: (ex["image"], ex["label"]))

  spec, _ = dataset(start, end)  # a split that is not there fails here, not at the first batch

  def items(lo, hi):
    lo, hi = start + lo, start + min(hi, end - start)
    if lo >= hi:
      return
    for data, label in tfds.as_numpy(dataset(lo, hi)[1].take(hi - lo)):
      yield data, int(label)

  return Source(f"tfds {TFDS_NAME} {spec} in {data_dir}", max(end - start, 0), items, _open_bytes)


def source(data_dir: str, split: str = "validation", *, kind: str = "auto",
           manual_dir: Optional[str] = None, limit: Optional[int] = None) -> Source:
  """A split from an image folder or TFDS. kind: 'auto' (folder if present, else TFDS),
  'folder' or 'tfds'. `limit` keeps the first examples (folder: a class-balanced prefix is
  not attempted; pass the whole set for the paper's protocol)."""
  if split not in _FOLDER_SPLITS:
    raise ValueError(f"split must be one of {sorted(_FOLDER_SPLITS)}, got {split!r}")
  if not data_dir:
    raise FileNotFoundError(_missing_message("<data.dir>", split))
  if kind not in ("auto", "folder", "tfds"):
    raise ValueError(f"data source kind must be auto, folder or tfds, got {kind!r}")
  if not _maybe_present(data_dir, split, kind, manual_dir):
    raise FileNotFoundError(_missing_message(data_dir, split))
  if kind in ("auto", "folder"):
    folder = find_folder(data_dir, split) if os.path.isdir(data_dir) else None
    if folder is not None:
      src = folder_source(folder)
      return _take(src, limit) if limit else src
    if kind == "folder":
      raise FileNotFoundError(_missing_message(data_dir, split))
  return tfds_source(data_dir, split, manual_dir=manual_dir, limit=limit)


def _maybe_present(data_dir: str, split: str, kind: str, manual_dir: Optional[str]) -> bool:
  """False when a local `data_dir` certainly holds no such split (missing or empty, no
  class folders, no TFDS dataset, no manual tar), so that the message comes at once
  instead of after importing TFDS. kind='tfds' and remote paths (gs://...) are left to
  TFDS."""
  if kind == "tfds" or "://" in data_dir:
    return True
  if not os.path.isdir(data_dir):
    return False
  if find_folder(data_dir, split) is not None:
    return True
  if kind == "folder":
    return False
  manual = manual_dir or os.path.join(data_dir, "downloads", "manual")
  return (os.path.isdir(os.path.join(data_dir, TFDS_NAME))
          or os.path.exists(os.path.join(manual, MANUAL_TARS[split])))


def check_train(data_dir: str, *, kind: str = "auto", manual_dir: Optional[str] = None) -> None:
  """Raises FileNotFoundError (saying what to provide) when no training split is there."""
  if not data_dir or not _maybe_present(data_dir, "train", kind, manual_dir):
    raise FileNotFoundError(_missing_message(data_dir or "<data.dir>", "train"))


def _take(src: Source, limit: int) -> Source:
  n = min(limit, src.num_examples)
  return dataclasses.replace(src, num_examples=n,
                             items=lambda start, stop: src.items(start, min(stop, n)))


# ----------------------------------------------------------------------------- batching


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def batches(src: Source, pre: zoo.Preprocessing, batch_size: int, *, workers: int = 8,
            prefetch: int = 2, process_index: int = 0, process_count: int = 1
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(float32 NHWC images, int32 labels) batches in source order; the last may be short.

  With several processes, yields only process `process_index`'s contiguous share of the
  source (`parallel.process_rows`) and reads no other example. Decoding and resizing run
  on a thread pool (PIL releases the GIL), `prefetch` batches ahead, so memory stays at a
  few batches whatever the split size.
  """
  start, stop = parallel.process_rows(src.num_examples, process_index, process_count)
  def load(raw):
    return transform(src.decode(raw), pre)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending: collections.deque = collections.deque()
    for chunk in _chunks(src.items(start, stop), batch_size):
      pending.append(([pool.submit(load, raw) for raw, _ in chunk], [y for _, y in chunk]))
      if len(pending) > prefetch:
        yield _collect(*pending.popleft())
    while pending:
      yield _collect(*pending.popleft())


def _collect(futures: Sequence[concurrent.futures.Future], labels: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray]:
  return np.stack([f.result() for f in futures]), np.asarray(labels, np.int32)


def load_all(src: Source, pre: zoo.Preprocessing, *, workers: int = 8
             ) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a (small) source as one array pair."""
  pairs = list(batches(src, pre, max(1, src.num_examples), workers=workers))
  if not pairs:
    raise ValueError(f"{src.description}: no examples")
  return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


# ----------------------------------------------------------------------------- calibration


def calibration_images(data_dir: str, pre: zoo.Preprocessing, num: int, seed: int = 0, *,
                       kind: str = "auto", manual_dir: Optional[str] = None,
                       workers: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """`num` training images with the evaluation transform: the real-data reference.

  Folder: a seeded uniform draw over every training file. TFDS: a seeded contiguous window
  of the train split (TFDS shuffles examples when it writes the split).
  """
  rng = np.random.default_rng(seed)
  folder = (find_folder(data_dir, "train")
            if kind in ("auto", "folder") and os.path.isdir(data_dir or "") else None)
  if folder is not None:
    src = folder_source(folder)
    examples = list(src.items(0, src.num_examples))
    if len(examples) < num:
      raise ValueError(f"{folder} has {len(examples)} images, fewer than the {num} asked for")
    chosen = [examples[i] for i in sorted(rng.choice(len(examples), num, replace=False))]
    src = dataclasses.replace(src, num_examples=num,
                              items=lambda start, stop: iter(chosen[start:stop]))
  elif kind == "folder":
    raise FileNotFoundError(_missing_message(data_dir, "train"))
  else:
    full = tfds_source(data_dir, "train", manual_dir=manual_dir)
    start = int(rng.integers(0, max(1, full.num_examples - num + 1)))
    src = tfds_source(data_dir, "train", manual_dir=manual_dir, start=start, limit=num)
  return load_all(src, pre, workers=workers)
