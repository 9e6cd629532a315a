"""`quantize`: the quantization stage end to end (calibrate -> reparam -> reconstruct)."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator, Optional, Sequence

import jax
import ml_collections
import numpy as np

from spdfq_jax.models import zoo
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import qmodel
from spdfq_jax.quant import weights
from spdfq_jax.quant.calibrate import calibrate
from spdfq_jax.quant.reconstruct import reconstruct
from spdfq_jax.quant.reparam import reparameterize


@contextlib.contextmanager
def _timed(timings: dict, stage: str) -> Iterator[None]:
  t = time.perf_counter()
  yield
  timings[stage] = round(time.perf_counter() - t, 3)


def quantize(module: zoo.Model, params: Any, calib_images: np.ndarray,
             cfg: Optional[ml_collections.ConfigDict] = None, workdir: Optional[str] = None,
             progress: bool = True, sparse_patches: int = 0,
             draws: Optional[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]] = None
             ) -> qmodel.QuantizedModel:
  """Quantizes an FP model with calibration images (real, noise or synthetic).

  Runs I&S-ViT's stages as `cfg` says (default: `default_config(4, 4)`, the full stage):
  calibrate -> (reconstruct with FP weights) -> (reparameterize) -> weight ranges ->
  (reconstruct with quantized weights; the teacher is always the FP model given). With a workdir, reconstruction
  resumes from its last finished unit. The per-unit reconstruction losses are kept in
  `qmodel.info['recon']`, the seconds each stage took in `qmodel.timings`. `draws`
  (stage one's, stage three's) replays given reconstruction batches instead of drawing them
  (`reconstruct`'s `draws`; stage one's is ignored when that stage does not run).
  """
  cfg = cfg if cfg is not None else qconfig.default_config()
  qconfig.validate(cfg)
  params = jax.tree_util.tree_map(np.asarray, params)
  teacher = params
  full = module
  if sparse_patches:
    if zoo.family(module) != "vit":
      raise ValueError("sparse_patches needs a ViT/DeiT (tokens after the position embedding)")
    module = module.clone(sparse_patches=int(sparse_patches))
  timings: dict[str, float] = {}
  with _timed(timings, "calibrate"):
    qstate = calibrate(module, params, calib_images, cfg)
  recon = cfg.recon.iters > 0
  log_acts = []
  if recon and cfg.recon.stages == "both":
    # I&S-ViT's stage one: activations quantized, weights FP, FP inputs.
    with _timed(timings, "reconstruct_acts"):
      params, log_acts = reconstruct(
          module, params, qstate, {}, calib_images, cfg,
          workdir=os.path.join(workdir, "recon_acts") if workdir else None,
          progress=progress, teacher=teacher, fp_inputs=True,
          draws=None if draws is None else draws[0])
  if cfg.reparam:
    with _timed(timings, "reparameterize"):
      params, qstate = reparameterize(params, qstate, cfg)
  wstate = weights.weight_state(params, cfg)
  log = []
  if recon:
    with _timed(timings, "reconstruct"):
      params, log = reconstruct(module, params, qstate, wstate, calib_images, cfg,
                                workdir=os.path.join(workdir, "recon") if workdir else None,
                                progress=progress, teacher=teacher,
                                draws=None if draws is None else draws[1])
  qm = qmodel.build(full, params, qstate, wstate, cfg)
  qm.info["recon"] = log
  qm.info["recon_acts"] = log_acts
  qm.timings = timings
  return qm
