"""Runs the whole pipeline for one config: synthesize -> quantize -> evaluate -> export.

  python -m spdfq_jax.main --config=configs/fmnist_w4a4.py [--workdir=DIR] \
      [--config.quant.w_bits=3 --config.synth.iterations=200 ...]

A config may compare several rows (synthesis method x bit setting). Every stage writes
its output under the workdir in a directory named after a hash of everything that
determines it, so a restart skips finished stages, resumes the interrupted one
(synthesis and reconstruction checkpoint themselves), and a changed setting never
reuses a stale result. The result table goes to report.json / report.md and stdout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterator, Optional

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from spdfq_jax import evaluate, parallel, report
from spdfq_jax.models import zoo

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/fmnist_w4a4.py", "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; default workdirs/<config name>.")

REAL = "real"  # the real-data reference row: training images instead of synthetic ones
EVAL_FILE = "eval.json"
SET_FILE = "result.npz"  # a calibration set: images (+ labels, priors, diagnostics)


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
    if not (item.startswith("w") and "a" in item):
      raise ValueError(f"bit setting {item!r} is not of the form w4a4")
    w, a = item[1:].split("a")
    out.append((int(w), int(a)))
  return out


def rows_of(config: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """(method, w_bits, a_bits) of every row, bit settings outermost."""
  methods = [m.strip() for m in config.methods.split(",") if m.strip()]
  bits = parse_bits(config.bits) if config.bits else [(config.quant.w_bits, config.quant.a_bits)]
  return [(m, w, a) for w, a in bits for m in methods]


def family_of(module: Any) -> str:
  return "swin" if isinstance(module, zoo.SwinTransformer) else "vit"


def channels_of(params: Any) -> int:
  return int(np.shape(params["patch_embed"]["kernel"])[2])


def preprocessing_of(config: ml_collections.ConfigDict, params: Any) -> zoo.Preprocessing:
  """The eval transform: fashion_mnist's for its test bed, else the registry's (or the
  checkpoint's own metadata for a model outside the registry)."""
  if config.data.name == "fashion_mnist":
    from spdfq_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
    return fashion_mnist.preprocessing(channels_of(params))
  if config.model.name in zoo.REGISTRY:
    return zoo.entry(config.model.name).preprocessing
  if config.model.checkpoint and config.model.checkpoint.endswith(".safetensors"):
    from spdfq_jax.models import native  # pylint: disable=g-import-not-at-top
    meta = native.read_metadata(config.model.checkpoint) or {}
    if "preprocessing" in meta:
      p = meta["preprocessing"]
      return zoo.Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
  return zoo.Preprocessing()


# ----------------------------------------------------------------------------- data


class Data:
  """Evaluation batches and real calibration images of the configured dataset."""

  def __init__(self, config: ml_collections.ConfigDict, pre: zoo.Preprocessing, channels: int):
    self.config, self.pre, self.channels = config, pre, channels
    self._fmnist_test = None

  @property
  def limit(self) -> Optional[int]:
    return self.config.eval.limit or None

  def eval_batches(self) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int]:
    c = self.config
    if c.data.name == "fashion_mnist":
      from spdfq_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
      if self._fmnist_test is None:
        self._fmnist_test = fashion_mnist.load("test", c.data.dir or None, self.channels)
      x, y = self._fmnist_test
      if self.limit:
        x, y = x[:self.limit], y[:self.limit]
      return evaluate.batches_from_arrays(x, y, c.eval.batch_size), len(x)
    if c.data.name == "imagenet":
      from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      src = imagenet.source(c.data.dir, "validation", kind=c.data.source,
                            manual_dir=c.data.manual_dir or None, limit=self.limit)
      logging.info("evaluation data: %s (%d images)", src.description, len(src))
      return imagenet.batches(src, self.pre, c.eval.batch_size, workers=c.data.workers), len(src)
    raise ValueError(f"data.name must be imagenet or fashion_mnist, got {c.data.name!r}")

  def real_images(self, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    c = self.config
    if c.data.name == "fashion_mnist":
      from spdfq_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
      images, labels = fashion_mnist.load_raw("train", c.data.dir or None)
      idx = np.sort(np.random.default_rng(seed).choice(len(images), num, replace=False))
      return fashion_mnist.normalise(images[idx], self.channels), labels[idx]
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
  scfg = stages.synth_config(method, family_of(module))
  for k, v in set_fields(config.synth).items():
    _assign(scfg, k, v)
  scfg.num_images, scfg.seed = config.num_images, config.seed
  scfg.mean, scfg.std = tuple(pre.mean), tuple(pre.std)
  return scfg, f"{method}-{fingerprint(scfg.to_dict(), model_key(config))}"


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
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, "result.tmp.npz")
  np.savez(tmp, images=images, classes=labels)
  os.replace(tmp, os.path.join(directory, SET_FILE))
  _save_grid(directory, images, pre)
  return images, {}


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
  the move. Every process of a multi-host run tries (on a shared disk the first one to
  get there moves a file, the others find it gone); none starts before all have finished.
  """
  from spdfq_jax.synth.generate import SUBDIR  # pylint: disable=g-import-not-at-top
  inner = os.path.join(directory, SUBDIR)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"synthesis done: {directory}")
  if not os.path.exists(os.path.join(inner, SET_FILE)):
    return
  for name in sorted(os.listdir(inner), key=lambda n: n == SET_FILE):
    src, dst = os.path.join(inner, name), os.path.join(directory, name)
    try:
      if os.path.isdir(dst) and not os.path.islink(dst):
        shutil.rmtree(dst)
      os.replace(src, dst)
    except FileNotFoundError:
      pass  # moved by another process
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
                               config.eval.batch_size, total=total, desc="eval FP")
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
  key = fingerprint(synth_name, qcfg.to_dict(), model_key(config), data_key(config),
                    config.eval.to_dict())
  row_dir = os.path.join(workdir, "rows", f"{method}_w{w_bits}a{a_bits}-{key}")
  export_path = os.path.join(row_dir, "quantized.safetensors")
  want_export = bool(config.export) and stages.export is not None
  cached = report.read_json(os.path.join(row_dir, EVAL_FILE))
  if cached is not None and (not want_export or os.path.exists(export_path)):
    logging.info("[%s W%dA%d] finished earlier: %s", method, w_bits, a_bits, row_dir)
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
      batches, total = data.eval_batches()
      result = evaluate.evaluate(qmodel.logits, batches, config.eval.batch_size, total=total,
                                 desc=f"eval {method} W{w_bits}A{a_bits}")
  else:  # only the export was missing
    result = {"top1": cached["quant_top1"], "top5": cached["quant_top5"],
              "count": cached["eval_count"]}
  if want_export and jax.process_index() == 0:
    with timed(timings, "export"):
      stages.export(export_path, qmodel)
  row = {"model": config.model.name, "method": method, "w_bits": w_bits, "a_bits": a_bits,
         "num_images": int(len(images)), "fp_top1": fp["top1"], "fp_top5": fp["top5"],
         "quant_top1": float(result["top1"]), "quant_top5": float(result["top5"]),
         "eval_count": int(result["count"]), "timings": timings, "row_dir": row_dir,
         "synth_dir": synth_dir, "export": export_path if want_export else None}
  # Data-free fit of the synthesis: class fit in percent, prior fit as a correlation.
  row.update({k: 100 * diag[k] if k.endswith("class_fit") else diag[k]
              for k in ("class_fit", "region_class_fit", "prior_fit", "prior_fit_chance")
              if k in diag})
  if jax.process_index() == 0:
    report.write_json(os.path.join(row_dir, EVAL_FILE), row)
  return row


def run(config: ml_collections.ConfigDict, workdir: str, stages: Optional[Stages] = None,
        config_name: str = "") -> dict:
  """The whole pipeline; returns the report (also written to workdir/report.{json,md})."""
  stages = stages or default_stages()
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  timings: dict[str, float] = {}
  with timed(timings, "load"):
    module, params = stages.load_model(config.model.name, config.model.checkpoint or None)
  pre = preprocessing_of(config, params)
  data = Data(config, pre, channels_of(params))
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
  out = dict(rows[0])
  out.update(
      title=config.get("title") or f"{config.model.name}: {', '.join(sorted({r['method'] for r in rows}))}",
      description=config.get("description") or "",
      config_name=config_name, workdir=os.path.abspath(workdir), rows=rows,
      fp_eval_count=fp["count"], load_seconds=timings["load"],
      fp_eval_seconds=timings.get("fp_eval"),
      total_seconds=round(time.perf_counter() - t_start, 3), date=report.now(),
      machine=report.machine(), packages=report.package_versions(),
      command=" ".join(sys.argv), config=config.to_dict())
  out["device_kind"] = out["machine"]["device_kind"]
  out["device_count"] = out["machine"]["device_count"]
  if jax.process_index() == 0:
    report.write(workdir, out)
  return out


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
  out = run(_CONFIG.value, workdir, config_name=config_arg)
  print()
  print(report.markdown(out).split("\n## Run")[0])
  print(f"report: {os.path.join(workdir, 'report.md')}  (total {out['total_seconds']:.1f} s)")


if __name__ == "__main__":
  app.run(main)
