"""The synthesis loop and its files: `generate` draws a run's start, runs the compiled step
(step.py) over the plan (plan.py) with checkpoints and resume, measures the result
(diagnostics.py) and writes it (result.py, figures from plots.py).

Every random draw comes from a key derived from `cfg.seed` and the global image index (and
the step number), never from the batch position or the device, so 1, 4 or 8 devices, a
padded batch, or a run resumed from a checkpoint all give the same images.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
import optax

from spdfq_jax import checkpoint, interrupt, parallel
from spdfq_jax.synth import config as synth_config
from spdfq_jax.synth import mimiq, psaq_v2, smi
from spdfq_jax.synth.diagnostics import diagnostics
from spdfq_jax.synth.draws import draw_labels, draw_priors, initial_images
from spdfq_jax.synth.layout import ModelInfo, apa_block_indices, model_info
from spdfq_jax.synth.plan import Plan, make_plan
from spdfq_jax.synth.readout import fetch_points, finite_or_raise, report_block
from spdfq_jax.synth.result import RESULT, SUBDIR, SynthResult, load_result, save_result
from spdfq_jax.synth.step import check_runtime, empty_log, make_step

CONFIG = "config.json"
# Methods with a loop of their own (check_config, make_plan, invert), not `optimise`.
OWN_LOOPS = {"smi": smi, "mimiq": mimiq}


def _config_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(synth_config.identity(cfg), sort_keys=True)


def _check_directory_config(directory: str, cfg: ml_collections.ConfigDict) -> None:
  path = os.path.join(directory, CONFIG)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != json.loads(_config_json(cfg)):
      raise ValueError(f"{directory} holds a synthesis run with another config; "
                       "use a fresh workdir or delete that directory.")
  else:
    parallel.barrier(f"synthesis config checked: {directory}")  # every process read it first
    parallel.on_primary(f"synthesis config written: {directory}", checkpoint.write_text, path,
                        _config_json(cfg))


def check_config(cfg: ml_collections.ConfigDict, info: Optional[ModelInfo] = None) -> None:
  """Every check of a synthesis config that needs no data (with the model's `info`, also
  those that need its layout), so a run can refuse a bad setting before its first stage:
  a ValueError naming the field."""
  own = OWN_LOOPS.get(cfg.method)
  if own is not None:  # its plan holds the checks that need the layout
    if info is None:
      own.check_config(cfg)
    else:
      own.make_plan(cfg, info)
    return
  if cfg.method == "psaq_v2":
    psaq_v2.check_config(cfg)
  if not isinstance(cfg.iterations, int) or cfg.iterations < 0:
    raise ValueError(f"synth.iterations must be an integer >= 0, got {cfg.iterations!r}")
  if not isinstance(cfg.rounds, int) or cfg.rounds < 1 or cfg.iterations % cfg.rounds:
    raise ValueError(f"synth.iterations ({cfg.iterations}) must split evenly into "
                     f"synth.rounds ({cfg.rounds}) rounds: give a multiple of {cfg.rounds}.")
  check_runtime(cfg)


def generate(module, params: Any, cfg: ml_collections.ConfigDict, *,
             workdir: Optional[str] = None, progress: bool = True,
             real_images: Optional[np.ndarray] = None,
             callback: Optional[Callable[[int, dict[str, float]], None]] = None,
             student: Optional[psaq_v2.StudentModel] = None) -> SynthResult:
  """Synthesises `cfg.num_images` calibration images against the FP model.

  With a workdir the run saves Orbax checkpoints every `cfg.checkpoint_every` steps into
  `workdir/synthetic/`, resumes from the newest one, and writes result.npz, config.json,
  grid.png and attention.png there; a finished run is loaded instead of recomputed.
  `real_images` feed `cfg.prior='real'`; `callback(step, terms)` runs once per step, in
  order, when the loop reads the device (every `cfg.log_every` steps and at checkpoints).
  `student` is PSAQ-ViT V2's quantized student (method psaq_v2 only; the caller builds it,
  e.g. `quant.student.student(module, params, w_bits, a_bits)`).
  """
  directory = None
  if workdir is not None:
    directory = os.path.join(workdir, SUBDIR)
    os.makedirs(directory, exist_ok=True)
    _check_directory_config(directory, cfg)
    if os.path.exists(os.path.join(directory, RESULT)):
      return load_result(os.path.join(directory, RESULT))

  info = model_info(module, params, cfg)
  blocks = apa_block_indices(info, cfg)
  labels = draw_labels(cfg, info)
  # Priors are drawn for every method: APA aligns to them, the others are measured against
  # them (the prior fit of images that never saw a prior is the chance level).
  pri = draw_priors(module, params, cfg, info, blocks, real_images)
  x0 = initial_images(cfg, info)
  result = SynthResult(x0, labels["classes"], labels["targets"],
                       labels["region_classes"] if cfg.msr else None,
                       labels["region_targets"] if cfg.msr else None, pri, blocks)
  if cfg.method == "smi":
    splan = smi.make_plan(cfg, info)
    last = smi.invert(module, params, cfg, info, x0, labels["targets"], splan,
                      directory=directory, progress=progress, callback=callback)
    result.images, result.kept_patches = smi.final_mask(module, params, cfg, info, last,
                                                        splan.final_keep)
  elif cfg.method == "mimiq":
    result.images = mimiq.invert(module, params, cfg, info, x0, labels["targets"],
                                 mimiq.make_plan(cfg, info), directory=directory,
                                 progress=progress, callback=callback)
  elif cfg.method != "noise":
    fixed = {"targets": labels["targets"], "region_targets": labels["region_targets"],
             "priors": pri if cfg.apa else []}
    if cfg.method == "psaq_v2":
      check_config(cfg)
      student = psaq_v2.require(student)
    result.images = optimise(module, params, cfg, info, blocks, x0, fixed, make_plan(cfg, info),
                             directory=directory, progress=progress, callback=callback,
                             student=student if cfg.method == "psaq_v2" else None)
  result.diagnostics = diagnostics(module, params, cfg, info, result)
  if directory is not None:
    parallel.on_primary(f"synthesis saved: {directory}", _save_files, directory, module, params,
                        result, cfg, info)
  return result


def _save_files(directory: str, module, params: Any, result: SynthResult,
                cfg: ml_collections.ConfigDict, info: ModelInfo) -> None:
  from spdfq_jax.synth import plots  # PIL only when writing files
  plots.save_figures(directory, module, params, result, cfg, info)
  save_result(directory, result, cfg)  # last: its presence means the set is complete


def optimise(module, params: Any, cfg: ml_collections.ConfigDict, info: ModelInfo,
             blocks: tuple[int, ...], x0: np.ndarray, fixed: dict, plan: Plan, *,
             directory: Optional[str] = None, progress: bool = True,
             callback: Optional[Callable[[int, dict[str, float]], None]] = None,
             student: Optional[psaq_v2.StudentModel] = None) -> np.ndarray:
  """Runs `plan` from `x0` with ONE Adam optimiser for all rounds (PSAQ-ViT: only the lr
  schedule restarts with a round); returns the final images.

  `fixed` holds per-image `targets`, `region_targets` and `priors` (the APA blocks').
  With a `directory`, checkpoints there every `cfg.checkpoint_every` steps and resumes
  from the newest one; on SIGTERM (`interrupt`) it checkpoints after the current step and
  raises `interrupt.Stopped`. With a `student` (PSAQ-ViT V2) each step is followed by the
  student's; its state is checkpointed with the images.
  """
  n = x0.shape[0]
  mesh = parallel.data_mesh()
  multiple = mesh.devices.size * cfg.microbatches
  pad = lambda a: parallel.pad_batch(np.asarray(a), multiple)[0]
  fixed = parallel.shard_batch(
      {"index": pad(np.arange(n, dtype=np.int32)),
       "mask": (np.arange(pad(x0).shape[0]) < n).astype(np.float32),
       "targets": pad(fixed["targets"]), "region_targets": pad(fixed["region_targets"]),
       "priors": [pad(p) for p in fixed["priors"]]}, mesh)
  rep = parallel.replicated(mesh)
  params = jax.device_put(params, rep)
  table = jax.device_put(plan.table(), rep)
  apply = student.apply if student is not None else None
  step_fn = make_step(module, cfg, info, blocks, mesh, apply)
  s0 = psaq_v2.initial_state(student, cfg, x0) if student is not None else None
  log = jax.device_put(empty_log(module, params, pad(x0), fixed, table, cfg, info, blocks,
                                 apply, s0), rep)
  total = len(plan.lr)

  def to_device(x, mu, nu, count):
    x = parallel.shard_batch(pad(x), mesh)
    st = optax.ScaleByAdamState(count=jax.device_put(np.int32(count), rep),
                                mu=parallel.shard_batch(pad(mu), mesh),
                                nu=parallel.shard_batch(pad(nu), mesh))
    return x, st

  mgr, start = None, 0
  x, opt_state = to_device(x0, np.zeros_like(x0), np.zeros_like(x0), 0)
  sstate = s0
  if directory is not None:
    mgr = checkpoint.manager(os.path.join(directory, "checkpoints"))
    like = {"images": x0, "mu": x0, "nu": x0, "count": np.zeros((), np.int32),
            "step": np.zeros((), np.int32)}
    if s0 is not None:
      like["student"] = psaq_v2.flat(jax.tree_util.tree_map(np.asarray, s0))
    restored = checkpoint.restore_latest(mgr, like)
    if restored is not None:
      _, s = restored
      start = int(s["step"])
      x, opt_state = to_device(s["images"], s["mu"], s["nu"], int(s["count"]))
      if s0 is not None:
        sstate = psaq_v2.unflat(s0, s["student"])
  t = jax.device_put(np.int32(start), rep)
  sstate = jax.device_put(sstate, rep)

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc=f"synth[{cfg.method}]", leave=False)
  try:
    saves = cfg.checkpoint_every if mgr is not None else total
    for first, end in fetch_points(start, total, cfg.log_every, saves):
      stop = False
      for s in range(first, end):
        x, opt_state, t, log, sstate = step_fn(params, x, opt_state, fixed, table, t, log,
                                               sstate)
        if interrupt.requested() and s + 1 < total:  # SIGTERM: save after this step, stop
          end, stop = s + 1, True
          break
      # The block's steps sit in rows first % K .. (end - 1) % K: one fetch for all of them.
      rows = slice(first % cfg.log_every, first % cfg.log_every + end - first)
      got = jax.device_get(log)
      finite_or_raise(first, {k: v[rows] for k, v in got["terms"].items()})
      values = {k: v[rows] for k, v in {**got["terms"], **got["stats"]}.items()}
      report_block(first, end, values, bar, callback)
      stop = stop or (interrupt.requested() and end < total)  # also one that came meanwhile
      if mgr is not None and (end % cfg.checkpoint_every == 0 or stop) and end < total:
        state = {  # global arrays: every process writes its own rows
            "images": x[:n], "mu": opt_state.mu[:n], "nu": opt_state.nu[:n],
            "count": opt_state.count, "step": np.asarray(end, np.int32)}
        if sstate is not None:
          state["student"] = psaq_v2.flat(sstate)
        checkpoint.save(mgr, end, state)
      if stop:
        raise interrupt.Stopped(f"synthesis ({cfg.method})", end)
  finally:
    if bar is not None:
      bar.close()
  return parallel.to_host(x)[:n].astype(np.float32)
