"""The stages of a run in order: load the FP model and check the inputs, evaluate it, then
per row synthesize (or read) the calibration set -> quantize -> evaluate -> export, and
write the report.

A config may compare several rows (synthesis method x bit setting). Every stage writes
its output under the workdir in a directory named after a hash of everything that
determines it (`workdir.fingerprint`), so a restart skips finished stages, resumes the
interrupted one (synthesis, reconstruction and evaluation save their progress), and a
changed setting never reuses a stale result.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from typing import Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from spdfq_jax import checkpoint, evaluate, parallel, report
from spdfq_jax.data.dataset import Data
from spdfq_jax.fp_model import load_model, model_label, preprocessing_of
from spdfq_jax.inputs import InputError, validate
from spdfq_jax.models import zoo
from spdfq_jax.rows import REAL, Stages, assign, default_stages, quant_config, rows_of, set_fields
from spdfq_jax.workdir import (data_key, fingerprint, flatten_synth_dir, model_key,
                               prepare_workdir, read_set, save_set, write_config)

EVAL_FILE = "eval.json"
EVAL_PROGRESS_FILE = "eval_progress.json"  # the counts of an evaluation so far, for a resume


@contextlib.contextmanager
def timed(timings: dict, stage: str) -> Iterator[None]:
  """Records wall time of a stage into `timings[stage]` and logs it."""
  logging.info("[%s] start", stage)
  t0 = time.perf_counter()
  yield
  timings[stage] = round(time.perf_counter() - t0, 3)
  logging.info("[%s] done in %.1f s", stage, timings[stage])


def synth_plan(stages: Stages, module, method: str, config, pre: zoo.Preprocessing,
               bits: Optional[tuple[int, int]] = None
               ) -> tuple[Optional[ml_collections.ConfigDict], str]:
  """(synthesis config or None for real images, its directory under workdir/synthetic).

  PSAQ-ViT V2's images depend on the row's `bits` (its student is quantized with them)."""
  if method == REAL:
    return None, f"{REAL}-{fingerprint(REAL, config.num_images, config.seed, data_key(config))}"
  from spdfq_jax.synth import config as synth_config  # pylint: disable=g-import-not-at-top
  scfg = stages.synth_config(method, zoo.family(module))
  for k, v in set_fields(config.synth).items():
    assign(scfg, k, v)
  scfg.num_images, scfg.seed = config.num_images, config.seed
  scfg.mean, scfg.std = tuple(pre.mean), tuple(pre.std)
  if method == "psaq_v2":
    if bits is None:
      raise ValueError("method psaq_v2 needs the row's bits (its student's)")
    scfg.v2_w_bits, scfg.v2_a_bits = bits
  return scfg, f"{method}-{fingerprint(synth_config.identity(scfg), model_key(config))}"


def check_synthesis(stages: Stages, module, params, config, pre: zoo.Preprocessing) -> None:
  """Each synthetic row's settings, checked against the loaded model (family, layout)
  before the first stage runs: one InputError naming the method and the field."""
  from spdfq_jax import synth  # pylint: disable=g-import-not-at-top
  for method, w, a in dict.fromkeys(r for r in rows_of(config) if r[0] != REAL):
    try:
      scfg, _ = synth_plan(stages, module, method, config, pre, (w, a))
      synth.check_config(scfg, synth.model_info(module, params, scfg))
    except ValueError as e:
      raise InputError(f"methods={config.methods!r}, row {method}: {e}") from e


def calibration_set(stages: Stages, module, params, scfg: Optional[ml_collections.ConfigDict],
                    directory: str, config, pre: zoo.Preprocessing, data: Data
                    ) -> tuple[np.ndarray, dict, Optional[np.ndarray]]:
  """(images, diagnostics, kept patches): synthesises (or, for the real row, reads) the
  calibration images, cached in `directory`; diagnostics are the synthesis' class and prior
  fit; kept patches (SMI's unmasked patches per image) or None."""
  cached = read_set(directory)
  if cached is not None:
    return cached
  if scfg is not None:
    # generate() works in its own subdirectory of the directory it is given (checkpoints,
    # resume); once it has finished, its files move up, so that a finished set lies in
    # synthetic/<method>-<hash>/ like the real one. A workdir from before this layout
    # (a finished or interrupted set in .../<method>-<hash>/synthetic/) resumes the same way.
    student = {}
    if scfg.method == "psaq_v2":  # its quantized student, at the row's bits
      from spdfq_jax.quant import student as quant_student  # pylint: disable=g-import-not-at-top
      student["student"] = quant_student.student(module, params, scfg.v2_w_bits,
                                                 scfg.v2_a_bits)
    result = stages.generate(module, params, scfg, workdir=directory, **student)
    flatten_synth_dir(directory)
    return (np.asarray(result.images), dict(getattr(result, "diagnostics", None) or {}),
            getattr(result, "kept_patches", None))
  images, labels = data.real_images(config.num_images, config.seed)
  parallel.on_primary(f"real set: {directory}", save_set, directory, images, labels, pre)
  return images, {}, None



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
  scfg, synth_name = synth_plan(stages, module, method, config, pre, (w_bits, a_bits))
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
    images, diag, kept = calibration_set(stages, module, params, scfg, synth_dir, config, pre,
                                         data)
  # SMI's reference calibrates on the unmasked patches only (smi_calibrate_kept).
  sparse = {"sparse_patches": int(kept.shape[1])} if (
      kept is not None and scfg.smi_calibrate_kept) else {}
  with timed(timings, "quantize"):
    qmodel = stages.quantize(module, params, images, qcfg, workdir=os.path.join(row_dir, "quant"),
                             **sparse)
  timings.update(getattr(qmodel, "timings", None) or {})
  if cached is None:
    with timed(timings, "evaluate"):
      from spdfq_jax.quant import integer_model  # pylint: disable=g-import-not-at-top
      logits_fn, eval_path = integer_model.eval_logits(qmodel, config.eval.integer)
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
              for k in ("class_fit", "region_class_fit", "kept_class_fit", "prior_fit",
                        "prior_fit_chance")
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
  check_synthesis(stages, module, params, config, pre)
  data = Data(config, pre, zoo.in_channels(module, params))
  data.check(module, need_train=REAL in [m for m, _, _ in rows_of(config)])
  write_config(workdir, config)  # only now: a run refused above leaves the workdir as it was
  fp = _fp_eval(module, params, data, config, workdir, timings)
  logging.info("FP top-1 %.2f  top-5 %.2f  (%d images)", fp["top1"], fp["top5"], fp["count"])
  rows = []
  paper = config.get("paper") or {}
  for method, w, a in rows_of(config):
    row = run_row(stages, module, params, config, pre, data, workdir, method, w, a, fp)
    if f"{method}_w{w}a{a}" in paper:
      row["paper_top1"] = paper[f"{method}_w{w}a{a}"]
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

