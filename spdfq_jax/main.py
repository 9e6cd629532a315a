"""Runs the whole pipeline for one config: synthesize -> quantize -> evaluate -> export.

  python -m spdfq_jax.main --config=configs/fmnist_w4a4.py [--workdir=DIR] \
      [--config.quant.w_bits=3 --config.synth.iterations=200 ...]

A config may compare several rows (synthesis method x bit setting). Every stage writes
its output under the workdir in a directory named after a hash of everything that
determines it, so a restart skips finished stages, resumes the interrupted one
(synthesis, reconstruction and evaluation save their progress), and a changed setting
never reuses a stale result. The result table goes to report.json / report.md and stdout.
SIGTERM stops the run after the current step with its state saved (exit status 143).

Inputs are checked before any stage runs: a bad setting, file or directory stops the run
with one message (`InputError`) that names the field or file and the fix; a workdir that
holds another config is refused (listing what differs) unless --reuse_workdir.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

from absl import app, flags, logging
import flax
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from spdfq_jax import data as data_lib
from spdfq_jax import checkpoint, evaluate, interrupt, parallel, report
from spdfq_jax.models import zoo

# ----------------------------------------------------------------------------- command line

DEFAULT_CONFIG = "configs/fmnist_w4a4.py"


def override_problems(argv: list[str], default_config: str = DEFAULT_CONFIG) -> list[str]:
  """One line per --config.<path>=... argument whose path names no field of the config,
  with the nearest field and the fields there are."""
  config_arg = default_config
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      config_arg = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      config_arg = argv[i + 1]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", config_arg, flag_values=fv,
                                  sys_argv=["prog", f"--config={config_arg}"])
  fv(["prog", f"--config={config_arg}"])
  config = fv.config
  out = []
  for a in argv:
    if not a.startswith("--config."):
      continue
    path = a[len("--config."):].split("=", 1)[0]
    node, done = config, []
    for part in path.split("."):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        done.append(part)
        continue
      keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      where = ".".join(done) or "the config"
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f" Did you mean --config.{'.'.join(done + close)}?" if close else ""
      listed = f" Fields of {where}: {', '.join(keys)}." if keys else f" {where} is not a block."
      out.append(f"{a}: {config_arg} has no field {'.'.join(done + [part])!r}.{hint}{listed}")
      break
  return out


def _exit_on_unknown_fields(argv: list[str]) -> None:
  problems = override_problems(argv)
  if problems:
    sys.exit("error: " + "\nerror: ".join(problems))


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing, except that an override of a field the config lacks exits with
  the field named instead of an AttributeError."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on "
             "flags.")
  except (AttributeError, KeyError):
    _exit_on_unknown_fields(argv)
    raise


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS,
                       argv: Optional[list[str]] = None) -> Any:
  """--config, whose overrides config_flags applies as it is defined: one naming no field
  of the config exits with the field named instead of an AttributeError."""
  try:
    return config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file (configs/*.py[:arg]).", flag_values=flag_values,
        lock_config=True, sys_argv=argv)
  except (AttributeError, KeyError):
    _exit_on_unknown_fields(argv if argv is not None else sys.argv)
    raise


_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; default workdirs/<config name>.")
_REUSE = flags.DEFINE_bool(
    "reuse_workdir", False, "Run in a workdir that holds another config: finished stages of "
    "either stay cached (each is keyed by its own settings); config.json and the report "
    "then describe this run.")

REAL = "real"  # the real-data reference row: training images instead of synthetic ones
EVAL_FILE = "eval.json"
EVAL_PROGRESS_FILE = "eval_progress.json"  # the counts of an evaluation so far, for a resume
CONFIG_FILE = "config.json"
SET_FILE = "result.npz"  # a calibration set: images (+ labels, priors, diagnostics)
# Config fields that change no result: a workdir holding a config that differs only in
# these is the same run.
COSMETIC = ("title", "description", "data.workers", "paper_top1", "export", "export_to")


class InputError(ValueError):
  """A bad setting, input file or directory; the message names it and the fix."""


# ----------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Stages:
  """The stage functions main wires together (tests swap in small fakes)."""
  load_model: Callable[..., tuple[Any, Any]]
  synth_config: Callable[..., ml_collections.ConfigDict]
  generate: Callable[..., Any]
  quant_config: Callable[..., ml_collections.ConfigDict]
  quantize: Callable[..., Any]
  export: Optional[Callable[[str, Any], None]]


def default_stages() -> Stages:
  from spdfq_jax import models, quant, synth  # pylint: disable=g-import-not-at-top
  return Stages(models.load, synth.default_config, synth.generate, quant.default_config,
                quant.quantize, quant.export.save)


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def timed(timings: dict, stage: str) -> Iterator[None]:
  """Records wall time of a stage into `timings[stage]` and logs it."""
  logging.info("[%s] start", stage)
  t0 = time.perf_counter()
  yield
  timings[stage] = round(time.perf_counter() - t0, 3)
  logging.info("[%s] done in %.1f s", stage, timings[stage])


def fingerprint(*parts: Any) -> str:
  """Short stable hash of JSON-able parts: names a stage directory after its inputs."""
  text = json.dumps(report.to_jsonable(parts), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def set_fields(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Dotted path -> value of every leaf that is not None (placeholders left unset drop out)."""
  out = {}
  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(v, prefix + k + ".")
      elif v is not None:
        out[prefix + k] = list(v) if isinstance(v, tuple) else v
  walk(cfg.to_dict(), "")
  return out


def model_key(config: ml_collections.ConfigDict) -> dict:
  """What identifies the FP model: name, path, and the file's size and mtime (new weights at
  the same path must not reuse results)."""
  key = config.model.to_dict()
  if not key.get("arch"):  # unset: the same key as before the field existed
    key.pop("arch", None)
  path = config.model.checkpoint
  if path and os.path.exists(path):
    st = os.stat(path)
    key["file"] = [st.st_size, int(st.st_mtime)]
  return key


def data_key(config: ml_collections.ConfigDict) -> dict:
  """What identifies the data (the number of decoding threads does not)."""
  return {k: v for k, v in config.data.to_dict().items() if k != "workers"}


def parse_bits(spec: str) -> list[tuple[int, int]]:
  """'w4a4,w3a3' -> [(4, 4), (3, 3)]."""
  out = []
  for item in filter(None, (s.strip().lower() for s in spec.split(","))):
    m = re.fullmatch(r"w(\d+)a(\d+)", item)
    if not m:
      raise ValueError(f"bit setting {item!r} is not of the form w4a4 (integer weight and "
                       "activation bits)")
    out.append((int(m.group(1)), int(m.group(2))))
  return out


def rows_of(config: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """(method, w_bits, a_bits) of every row, bit settings outermost."""
  methods = [m.strip() for m in config.methods.split(",") if m.strip()]
  bits = parse_bits(config.bits) if config.bits else [(config.quant.w_bits, config.quant.a_bits)]
  return [(m, w, a) for w, a in bits for m in methods]


def preprocessing_of(config: ml_collections.ConfigDict, module: zoo.Model, params: Any
                     ) -> zoo.Preprocessing:
  """The eval transform: the test bed's for a built-in test bed; else the checkpoint's own
  (our format's metadata), the registry's, or timm's defaults, at the model's input size."""
  if config.data.name in data_lib.TEST_BEDS:
    return data_lib.test_bed(config.data.name).preprocessing(zoo.in_channels(module, params))
  pre = None
  path = config.model.checkpoint
  if path and path.endswith(".safetensors"):
    from spdfq_jax.models import native  # pylint: disable=g-import-not-at-top
    p = (native.read_metadata(path) or {}).get("preprocessing")
    if p:
      pre = zoo.Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
  base = (config.model.get("arch") or "").partition(":")[0].strip() or config.model.name
  if pre is None and base in zoo.REGISTRY:
    pre = zoo.entry(base).preprocessing
  if pre is None:
    logging.warning("no preprocessing known for %s: timm's defaults (crop 0.875, ImageNet "
                    "mean/std)", model_label(config))
    pre = zoo.Preprocessing()
  return dataclasses.replace(pre, input_size=module.img_size)


def model_label(config: ml_collections.ConfigDict) -> str:
  """The model's name in the report: model.name, or the checkpoint's when the name is only
  the built-in default (an asset) or empty."""
  from spdfq_jax.models import convert  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.checkpoint and (not m.name or m.name in convert.ASSETS):
    stem = os.path.splitext(os.path.basename(m.checkpoint))[0]
    if stem in ("model", "pytorch_model", "checkpoint"):  # hub layout: <tag>/model.*
      stem = os.path.basename(os.path.dirname(os.path.abspath(m.checkpoint))) or stem
    return stem
  return m.name or m.get("arch") or "model"


def load_spec(config: ml_collections.ConfigDict) -> Optional[str]:
  """What `models.load` gets as the model: model.arch, else a registry name or built-in
  asset, else None (the checkpoint says: our format's metadata, or its shapes)."""
  from spdfq_jax.models import convert  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.get("arch"):
    return m.arch
  if m.checkpoint and m.name in convert.ASSETS:
    return None  # the test-bed default name; the given file describes itself
  if m.name in zoo.REGISTRY or m.name in convert.ASSETS:
    return m.name
  return None


# ----------------------------------------------------------------------------- data


class Data:
  """Evaluation batches and real calibration images of the configured dataset."""

  def __init__(self, config: ml_collections.ConfigDict, pre: zoo.Preprocessing, channels: int):
    self.config, self.pre, self.channels = config, pre, channels
    self._test_bed_test = None
    self._source = None

  @property
  def limit(self) -> Optional[int]:
    return self.config.eval.limit or None

  def check(self, module: zoo.Model, need_train: bool) -> None:
    """Fails now, naming data.dir and the fix, rather than after the synthesis: the
    evaluation split (and the training split for the real row) must be there and match
    the model's input and classes."""
    c = self.config
    if c.data.name in data_lib.TEST_BEDS:
      bed = data_lib.test_bed(c.data.name)
      channels = (1, 3) if c.data.name == "fashion_mnist" else (3,)
      if module.img_size != bed.IMG_SIZE or self.channels not in channels:
        raise InputError(
            f"data.name={c.data.name} gives {bed.IMG_SIZE}x{bed.IMG_SIZE} images with "
            f"{' or '.join(map(str, channels))} channels; the model takes {module.img_size}x"
            f"{module.img_size}x{self.channels}. Use the data.name of the model's test bed "
            "(fashion_mnist, scenes), or imagenet for an ImageNet model.")
      if module.num_classes != bed.NUM_CLASSES:
        raise InputError(f"data.name={c.data.name} has {bed.NUM_CLASSES} classes; "
                         f"the model predicts {module.num_classes}.")
      try:  # the evaluation split is read here once, and kept for eval_batches
        self._test_bed_test = bed.load("test", c.data.dir or None, self.channels)
        if need_train:
          bed.check("train", c.data.dir or None)
      except (FileNotFoundError, ValueError) as e:
        raise InputError(f"data.dir={c.data.dir!r}: {e}") from e
      return
    if self.channels != 3:
      raise InputError(f"the model takes {self.channels}-channel images; data.name={c.data.name}"
                       " gives RGB. Use a 3-channel checkpoint (or data.name=fashion_mnist "
                       "for a grey-scale test-bed model).")
    src = self.eval_source()
    if src.num_classes != module.num_classes:
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      if src.num_classes == imagenet.NUM_CLASSES:
        what = "ImageNet-1k (1000 classes, folders named by WordNet id)"
      else:
        what = (f"{src.num_classes} class folders not named by WordNet id, labelled 0.."
                f"{src.num_classes - 1} in sorted order")
      raise InputError(
          f"data.dir={c.data.dir!r}: {src.description} holds {what}, but the model predicts "
          f"{module.num_classes} classes. An ImageNet folder needs val/<wnid>/ folders "
          "(n01440764 ...; a subset of the 1000 is fine); otherwise use a checkpoint whose "
          "head matches the folder's classes.")
    if need_train:
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      try:
        imagenet.check_train(c.data.dir, kind=c.data.source, manual_dir=c.data.manual_dir or None)
      except FileNotFoundError as e:
        raise InputError(f"the real row needs training images: {e}") from e

  def eval_source(self):
    """The ImageNet evaluation split, opened once."""
    if self._source is None:
      c = self.config
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      try:
        self._source = imagenet.source(c.data.dir, "validation", kind=c.data.source,
                                       manual_dir=c.data.manual_dir or None, limit=self.limit)
      except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
      logging.info("evaluation data: %s (%d images)", self._source.description,
                   len(self._source))
    return self._source

  def eval_batches(self) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int]:
    """(this process's share of the evaluation set in batches, size of the whole set)."""
    c = self.config
    rows = evaluate.process_batch_size(c.eval.batch_size)
    share = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    if c.data.name in data_lib.TEST_BEDS:
      if self._test_bed_test is None:
        self._test_bed_test = data_lib.test_bed(c.data.name).load(
            "test", c.data.dir or None, self.channels)
      x, y = self._test_bed_test
      if self.limit:
        x, y = x[:self.limit], y[:self.limit]
      return evaluate.batches_from_arrays(x, y, rows, **share), len(x)
    if c.data.name == "imagenet":
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      src = self.eval_source()
      return imagenet.batches(src, self.pre, rows, workers=c.data.workers, **share), len(src)
    raise ValueError(f"data.name must be imagenet, fashion_mnist or scenes, got {c.data.name!r}")

  def real_images(self, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    c = self.config
    if c.data.name in data_lib.TEST_BEDS:
      return data_lib.test_bed(c.data.name).calibration_images(num, seed, c.data.dir or None,
                                                               self.channels)
    from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    return imagenet.calibration_images(c.data.dir, self.pre, num, seed, kind=c.data.source,
                                       manual_dir=c.data.manual_dir or None,
                                       workers=c.data.workers)


# ----------------------------------------------------------------------------- pipeline


def synth_plan(stages: Stages, module, method: str, config, pre: zoo.Preprocessing
               ) -> tuple[Optional[ml_collections.ConfigDict], str]:
  """(synthesis config or None for real images, its directory under workdir/synthetic)."""
  if method == REAL:
    return None, f"{REAL}-{fingerprint(REAL, config.num_images, config.seed, data_key(config))}"
  from spdfq_jax.synth import config as synth_config  # pylint: disable=g-import-not-at-top
  scfg = stages.synth_config(method, zoo.family(module))
  for k, v in set_fields(config.synth).items():
    _assign(scfg, k, v)
  scfg.num_images, scfg.seed = config.num_images, config.seed
  scfg.mean, scfg.std = tuple(pre.mean), tuple(pre.std)
  return scfg, f"{method}-{fingerprint(synth_config.identity(scfg), model_key(config))}"


def calibration_set(stages: Stages, module, params, scfg: Optional[ml_collections.ConfigDict],
                    directory: str, config, pre: zoo.Preprocessing, data: "Data"
                    ) -> tuple[np.ndarray, dict]:
  """(images, diagnostics): synthesises (or, for the real row, reads) the calibration
  images, cached in `directory`; diagnostics are the synthesis' class and prior fit."""
  cached = read_set(directory)
  if cached is not None:
    return cached
  if scfg is not None:
    # generate() works in its own subdirectory of the directory it is given (checkpoints,
    # resume); once it has finished, its files move up, so that a finished set lies in
    # synthetic/<method>-<hash>/ like the real one. A workdir from before this layout
    # (a finished or interrupted set in .../<method>-<hash>/synthetic/) resumes the same way.
    result = stages.generate(module, params, scfg, workdir=directory)
    flatten_synth_dir(directory)
    return np.asarray(result.images), dict(getattr(result, "diagnostics", None) or {})
  images, labels = data.real_images(config.num_images, config.seed)
  parallel.on_primary(f"real set: {directory}", _save_set, directory, images, labels, pre)
  return images, {}


def _save_set(directory: str, images: np.ndarray, labels: np.ndarray,
              pre: zoo.Preprocessing) -> None:
  os.makedirs(directory, exist_ok=True)
  _save_grid(directory, images, pre)
  with checkpoint.atomic_path(os.path.join(directory, SET_FILE)) as tmp:  # last: marks it done
    np.savez(tmp, images=images, classes=labels)


def read_set(directory: str) -> Optional[tuple[np.ndarray, dict]]:
  """(images, diagnostics) of a finished calibration set in `directory`, or None."""
  path = os.path.join(directory, SET_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    diag = json.loads(str(z["diagnostics"])) if "diagnostics" in z.files else {}
    return z["images"], diag


def flatten_synth_dir(directory: str) -> None:
  """Moves a finished synthesis out of generate()'s subdirectory into `directory`.

  The result file moves last, so a kill midway leaves it inside and the next run finishes
  the move. In a multi-process run process 0 moves them once every process is done with
  the synthesis, and the others wait.
  """
  parallel.barrier(f"synthesis done: {directory}")
  parallel.on_primary(f"synthesis moved: {directory}", _move_up, directory)


def _move_up(directory: str) -> None:
  from spdfq_jax.synth.generate import SUBDIR  # pylint: disable=g-import-not-at-top
  inner = os.path.join(directory, SUBDIR)
  if not os.path.exists(os.path.join(inner, SET_FILE)):
    return
  for name in sorted(os.listdir(inner), key=lambda n: n == SET_FILE):
    src, dst = os.path.join(inner, name), os.path.join(directory, name)
    if os.path.isdir(dst) and not os.path.islink(dst):
      shutil.rmtree(dst)
    os.replace(src, dst)
  with contextlib.suppress(OSError):
    os.rmdir(inner)


def _assign(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f"unknown setting {dotted!r}")
  node[leaf] = tuple(value) if isinstance(value, list) and isinstance(node[leaf], tuple) else value


def _save_grid(directory: str, images: np.ndarray, pre: zoo.Preprocessing) -> None:
  c = images.shape[-1]
  mean = pre.mean if len(pre.mean) == c else pre.mean[:1] * c
  std = pre.std if len(pre.std) == c else pre.std[:1] * c
  report.save_image_grid(os.path.join(directory, "grid.png"), images, mean, std)


def quant_config(stages: Stages, config: ml_collections.ConfigDict, w_bits: int,
                 a_bits: int) -> ml_collections.ConfigDict:
  """quant.default_config for one bit setting, with the config's explicit quant fields."""
  fields = set_fields(config.quant)
  preset = fields.pop("preset", "full")
  fields.pop("w_bits", None)
  fields.pop("a_bits", None)
  fields.setdefault("recon.seed", config.seed)
  return stages.quant_config(w_bits, a_bits, preset, **fields)


def _fp_eval(module, params, data: Data, config, workdir: str, timings: dict) -> dict:
  key = fingerprint(model_key(config), data_key(config), config.eval.to_dict())
  path = os.path.join(workdir, f"fp_eval-{key}.json")
  cached = report.read_json(path)
  if cached is not None:
    timings["fp_eval"] = cached.get("seconds", 0.0)
    return cached
  apply = jax.jit(module.apply)
  with timed(timings, "fp_eval"):
    batches, total = data.eval_batches()
    result = evaluate.evaluate(lambda x: apply({"params": params}, x), batches,
                               config.eval.batch_size, total=total, desc="eval FP",
                               progress_path=os.path.join(workdir, f"fp_eval-{key}.progress.json"))
  result = dict(result, seconds=timings["fp_eval"])
  if jax.process_index() == 0:
    report.write_json(path, result)
  return result


def run_row(stages: Stages, module, params, config, pre, data: Data, workdir: str,
            method: str, w_bits: int, a_bits: int, fp: dict) -> dict:
  """One table row: calibration images -> quantized model -> accuracy -> export.

  A row whose eval.json (and export) exist is returned as recorded, timings included, so a
  finished run re-reports the same table.
  """
  qcfg = quant_config(stages, config, w_bits, a_bits)
  scfg, synth_name = synth_plan(stages, module, method, config, pre)
  synth_dir = os.path.join(workdir, "synthetic", synth_name)
  from spdfq_jax.quant import config as quant_settings  # pylint: disable=g-import-not-at-top
  key = fingerprint(synth_name, quant_settings.identity(qcfg), model_key(config),
                    data_key(config), config.eval.to_dict())
  row_dir = os.path.join(workdir, "rows", f"{method}_w{w_bits}a{a_bits}-{key}")
  export_path = os.path.join(row_dir, "quantized.safetensors")
  want_export = bool(config.export) and stages.export is not None
  cached = report.read_json(os.path.join(row_dir, EVAL_FILE))
  if cached is not None and (not want_export or os.path.exists(export_path)):
    logging.info("[%s W%dA%d] finished earlier: %s", method, w_bits, a_bits, row_dir)
    copy_export(config, cached.get("export"))
    return cached
  os.makedirs(row_dir, exist_ok=True)
  timings: dict[str, float] = dict(cached["timings"]) if cached else {}
  with timed(timings, "synthesize" if scfg is not None else "real_images"):
    images, diag = calibration_set(stages, module, params, scfg, synth_dir, config, pre, data)
  with timed(timings, "quantize"):
    qmodel = stages.quantize(module, params, images, qcfg, workdir=os.path.join(row_dir, "quant"))
  timings.update(getattr(qmodel, "timings", None) or {})
  if cached is None:
    with timed(timings, "evaluate"):
      from spdfq_jax.quant import integer  # pylint: disable=g-import-not-at-top
      logits_fn, eval_path = integer.eval_logits(qmodel, config.eval.integer)
      batches, total = data.eval_batches()
      result = evaluate.evaluate(logits_fn, batches, config.eval.batch_size, total=total,
                                 desc=f"eval {method} W{w_bits}A{a_bits}",
                                 progress_path=os.path.join(row_dir, EVAL_PROGRESS_FILE))
  else:  # only the export was missing
    result = {"top1": cached["quant_top1"], "top5": cached["quant_top5"],
              "count": cached["eval_count"]}
    eval_path = cached.get("eval_path")
  if want_export and jax.process_index() == 0:
    with timed(timings, "export"):
      stages.export(export_path, qmodel)
  row = {"model": model_label(config), "method": method, "w_bits": w_bits, "a_bits": a_bits,
         "num_images": int(len(images)), "fp_top1": fp["top1"], "fp_top5": fp["top5"],
         "quant_top1": float(result["top1"]), "quant_top5": float(result["top5"]),
         "eval_count": int(result["count"]), "eval_path": eval_path, "timings": timings,
         "row_dir": row_dir,
         "synth_dir": synth_dir, "export": export_path if want_export else None}
  # Data-free fit of the synthesis: class fit in percent, prior fit as a correlation.
  row.update({k: 100 * diag[k] if k.endswith("class_fit") else diag[k]
              for k in ("class_fit", "region_class_fit", "prior_fit", "prior_fit_chance")
              if k in diag})
  if jax.process_index() == 0:
    report.write_json(os.path.join(row_dir, EVAL_FILE), row)
  copy_export(config, row["export"])
  return row


def copy_export(config: ml_collections.ConfigDict, export_path: Optional[str]) -> None:
  """Copies the row's export to config.export_to, never over an existing file."""
  dst = config.get("export_to")
  if not dst or not export_path or jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  if os.path.exists(dst):
    raise InputError(f"export_to={dst!r} exists (appeared during the run); the export is in "
                     f"{export_path}.")
  with checkpoint.atomic_path(dst) as tmp:
    shutil.copyfile(export_path, tmp)
  logging.info("exported to %s", dst)


def run(config: ml_collections.ConfigDict, workdir: str, stages: Optional[Stages] = None,
        config_name: str = "", reuse_workdir: bool = False) -> dict:
  """The whole pipeline; returns the report (also written to workdir/report.{json,md})."""
  stages = stages or default_stages()
  t_start = time.perf_counter()
  validate(config, stages)
  prepare_workdir(workdir, config, reuse_workdir)
  timings: dict[str, float] = {}
  with timed(timings, "load"):
    module, params = load_model(stages, config)
  pre = preprocessing_of(config, module, params)
  data = Data(config, pre, zoo.in_channels(module, params))
  data.check(module, need_train=REAL in [m for m, _, _ in rows_of(config)])
  write_config(workdir, config)  # only now: a run refused above leaves the workdir as it was
  fp = _fp_eval(module, params, data, config, workdir, timings)
  logging.info("FP top-1 %.2f  top-5 %.2f  (%d images)", fp["top1"], fp["top5"], fp["count"])
  rows = []
  paper = config.get("paper_top1")
  for method, w, a in rows_of(config):
    row = run_row(stages, module, params, config, pre, data, workdir, method, w, a, fp)
    if paper is not None and (method, w, a) == rows_of(config)[0]:
      row["paper_top1"] = paper
    rows.append(row)
    logging.info("%s W%dA%d: top-1 %.2f (FP %.2f)", method, w, a, row["quant_top1"], fp["top1"])
  label = model_label(config)
  out = dict(rows[0])
  out.update(
      title=config.get("title") or f"{label}: {', '.join(sorted({r['method'] for r in rows}))}",
      description=config.get("description") or "",
      config_name=config_name, workdir=os.path.abspath(workdir), rows=rows,
      fp_eval_count=fp["count"], load_seconds=timings["load"],
      fp_eval_seconds=timings.get("fp_eval"),
      total_seconds=round(time.perf_counter() - t_start, 3), date=report.now(),
      machine=report.machine(), packages=report.package_versions(),
      command=" ".join(sys.argv), config=config.to_dict())
  out["device_kind"] = out["machine"]["device_kind"]
  out["device_count"] = out["machine"]["device_count"]
  parallel.on_primary(f"report: {workdir}", report.write, workdir, out)
  return out


# ----------------------------------------------------------------------------- input checks


def validate(config: ml_collections.ConfigDict, stages: Stages) -> None:
  """Every setting that can be checked without the model or the data, before anything
  runs: one InputError naming the field and the fix."""
  from spdfq_jax.synth import config as synth_config  # pylint: disable=g-import-not-at-top
  methods = [m.strip() for m in config.methods.split(",") if m.strip()]
  known = tuple(synth_config.METHODS) + (REAL,)
  bad = [m for m in methods if m not in known]
  if not methods or bad:
    what = "unknown " + ", ".join(bad) if bad else "empty"
    raise InputError(f"methods={config.methods!r}: {what}; choose from {', '.join(known)} "
                     "(comma-separated).")
  field = "bits" if config.bits else "quant.w_bits / quant.a_bits"
  try:
    rows = rows_of(config)
  except ValueError as e:
    raise InputError(f"bits={config.bits!r}: {e}, e.g. --config.bits=w4a4,w3a3.") from e
  for _, w, a in rows:
    for kind, b in (("weight", w), ("activation", a)):
      if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
        raise InputError(f"{field}: {kind} bits {b!r} are not an integer in 2..8 "
                         "(the paper's settings are 4 and 6).")
  for name, value, low in (("num_images", config.num_images, 1),
                           ("eval.batch_size", config.eval.batch_size, 1),
                           ("eval.limit", config.eval.limit, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise InputError(f"{name}={value!r}: must be an integer >= {low}"
                       + (" (the paper calibrates on 32 images)." if name == "num_images" else "."))
  if config.data.name not in ("imagenet",) + data_lib.TEST_BEDS:
    raise InputError(f"data.name={config.data.name!r}: must be imagenet, "
                     f"{', '.join(data_lib.TEST_BEDS)}.")
  if config.data.source not in ("auto", "folder", "tfds"):
    raise InputError(f"data.source={config.data.source!r}: must be auto, folder or tfds.")
  for _, w, a in rows:
    try:
      quant_config(stages, config, w, a)
    except (ValueError, KeyError) as e:
      raise InputError(f"quant: {e}") from e
  for method in set(methods) - {REAL}:
    try:
      scfg = stages.synth_config(method, "vit")
      for k, v in set_fields(config.synth).items():
        _assign(scfg, k, v)
    except (ValueError, KeyError) as e:
      raise InputError(f"synth: {e}") from e
  validate_model(config)
  dst = config.get("export_to")
  if dst:
    if len(rows) != 1:
      raise InputError(f"export_to={dst!r} takes the one row of a single-row config; this one "
                       f"has {len(rows)}. Copy rows/*/quantized.safetensors instead.")
    if os.path.exists(dst):
      raise InputError(f"export_to={dst!r} exists: delete it or choose another path (the "
                       "quantized model is also kept in the row's directory of the workdir).")


def validate_model(config: ml_collections.ConfigDict) -> None:
  """model.name / arch / checkpoint: something to load, and a file that is there."""
  from spdfq_jax.models import arch, convert  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.get("arch"):
    try:
      arch.parse(m.arch)
    except ValueError as e:
      raise InputError(f"model.arch: {e}") from e
  if not m.checkpoint:
    if m.name in convert.ASSETS:
      return
    if m.name not in zoo.REGISTRY:
      raise InputError(f"model.name: {convert.unknown_model_message(m.name or '')} Or give a "
                       "checkpoint: --config.model.checkpoint=FILE.")
    tag = zoo.entry(m.name).checkpoint_tag
    raise InputError(f"model.checkpoint is empty: nothing is downloaded at run time. Get {tag} "
                     f"(huggingface.co/timm/{tag}) and pass --config.model.checkpoint=FILE.")
  if not os.path.isfile(m.checkpoint):
    tag = zoo.entry(m.name).checkpoint_tag if m.name in zoo.REGISTRY else None
    get = (f" Get it with `huggingface-cli download timm/{tag} --local-dir "
           f"checkpoints/{tag}`." if tag else "")
    raise InputError(f"model.checkpoint={m.checkpoint!r} is not a file.{get}")


def load_model(stages: Stages, config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(module, params) of the configured model; a bad file or architecture is an InputError
  that says which setting to change."""
  try:
    module, params = stages.load_model(load_spec(config), config.model.checkpoint or None)
  except (ValueError, FileNotFoundError, ImportError) as e:
    m = config.model
    raise InputError(
        f"{e}\n(model.name={m.name!r}, model.arch={m.get('arch') or ''!r}, model.checkpoint="
        f"{m.checkpoint!r}: fix the file, or give its architecture with "
        "--config.model.arch=... / a matching --config.model.name=...)") from e
  _warn_if_renamed(config, module)
  return module, params


def _warn_if_renamed(config: ml_collections.ConfigDict, module: Any) -> None:
  """Our own format carries its architecture, which wins over model.name: say so when the
  two differ, since the report still names the model model.name."""
  name = load_spec(config)
  if name not in zoo.REGISTRY or not isinstance(module, (zoo.VisionTransformer,
                                                         zoo.SwinTransformer)):
    return
  from spdfq_jax.models import arch  # pylint: disable=g-import-not-at-top
  named = zoo.build(name, num_classes=module.num_classes)
  if arch.module_spec(named) != arch.module_spec(module):
    logging.warning("%s holds %s, not %s (%s): its own architecture is used",
                    config.model.checkpoint, arch.module_spec(module), name,
                    arch.module_spec(named))


def config_changes(old: dict, new: dict) -> list[str]:
  """'field: old -> new' for every setting that differs (fields one side lacks count only
  when set, so a field added to the configs since does not)."""
  a, b = (flax.traverse_util.flatten_dict(d, sep=".") for d in (old, new))
  unset = (None, "", [], {})
  out = []
  for k in sorted(set(a) | set(b)):
    if k in COSMETIC or k.split(".")[0] in COSMETIC:
      continue
    va, vb = a.get(k), b.get(k)
    if va != vb and not (va in unset and vb in unset):
      out.append(f"{k}: {json.dumps(va)} -> {json.dumps(vb)}")
  return out


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, reuse: bool) -> None:
  """Creates the workdir and checks that it is writable and holds no other config."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise InputError(f"workdir {workdir!r} is not a writable directory ({e.strerror or e}): "
                     "pass --workdir=DIR somewhere you can write.") from e
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json_best_effort())
  old = report.read_json(path) if os.path.exists(path) else None
  changes = config_changes(old, new) if old is not None else []
  if changes and not reuse:
    listed = "\n  ".join(changes[:20]) + (f"\n  ... and {len(changes) - 20} more"
                                          if len(changes) > 20 else "")
    raise InputError(
        f"workdir {workdir!r} holds a run of another config ({len(changes)} fields differ):\n"
        f"  {listed}\nUse another --workdir, or --reuse_workdir to run here anyway (the "
        "finished stages of both stay cached; config.json and the report then describe "
        "this run).")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    checkpoint.write_text(os.path.join(workdir, CONFIG_FILE),
                          config.to_json_best_effort(indent=2))


def default_workdir(config_arg: str) -> str:
  """workdirs/<config file stem>[_<arg>]: 'configs/vit_base.py:w6a6' -> workdirs/vit_base_w6a6."""
  path, _, arg = config_arg.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  suffix = "_" + "".join(ch if ch.isalnum() else "_" for ch in arg) if arg else ""
  return os.path.join("workdirs", stem + suffix)


def _quiet_libraries() -> None:
  """Keeps INFO lines of this package only: checkpointing libraries log every save."""
  import logging as pylogging  # pylint: disable=g-import-not-at-top

  class Filter(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
      return record.levelno >= pylogging.WARNING or f"{os.sep}spdfq_jax{os.sep}" in record.pathname

  logging.get_absl_handler().addFilter(Filter())


def main(argv: list[str]) -> None:
  del argv
  _quiet_libraries()
  parallel.maybe_initialize_distributed()
  config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
  for a in sys.argv[1:]:  # keep the ':arg' part, which get_config_filename drops
    if a.startswith("--config=") and ":" in a:
      config_arg = a.split("=", 1)[1]
  workdir = _WORKDIR.value or default_workdir(config_arg)
  logging.info("config %s -> workdir %s; %d x %s", config_arg, workdir, jax.device_count(),
               jax.devices()[0].device_kind)
  try:
    with interrupt.stop_on_sigterm():
      out = run(_CONFIG.value, workdir, config_name=config_arg, reuse_workdir=_REUSE.value)
  except (InputError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  print()
  print(report.markdown(out).split("\n## Run")[0])
  print(f"report: {os.path.join(workdir, 'report.md')}  (total {out['total_seconds']:.1f} s)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
