"""Data-free measures of how well a synthesis met its objective: class fit of images and
regions, prior fit of the APA blocks' attention, and its chance level."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spdfq_jax.models import taps
from spdfq_jax.synth import losses, priors as priors_lib, regions
from spdfq_jax.synth.layout import ModelInfo
from spdfq_jax.synth.result import SynthResult


def chance_priors(cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...],
                  priors: list[np.ndarray]) -> list[np.ndarray]:
  """Priors the images were never aligned to: fresh mixtures (image indices n..2n-1), or,
  for real-attention priors, another image's prior. Their fit is the chance level."""
  if cfg.prior == priors_lib.REAL:
    return [np.roll(p, 1, 0) for p in priors]
  layout = [(info.heads[l], info.grid[l]) for l in blocks]
  n = cfg.num_images
  return priors_lib.draw_priors(cfg.seed, np.arange(n, 2 * n), layout, cfg.k_apa,
                                tuple(cfg.sigma_range), cfg.prior)


def diagnostics(module, params: Any, cfg: ml_collections.ConfigDict, info: ModelInfo,
                result: SynthResult) -> dict:
  """Data-free measures of how well the objective was met, on the final images.

  class_fit: share of images (and of MSR regions) the FP model assigns to their target
  (methods with class guidance).
  prior_fit: Pearson correlation of each APA block's achieved maps (CLS rows; Swin: per
  window) with the image's priors, mean over images, per block and head, and overall;
  prior_fit_chance: the same against priors the images never saw.
  kept_class_fit (SMI): class fit of the FP model on each image's kept patch tokens only.
  """
  images = jnp.asarray(result.images)
  blocks = result.apa_blocks

  @jax.jit
  def run(params, x, pri, chance):
    logits, attns, _ = taps.apply_with_attention(module, {"params": params}, x)
    fit = losses.prior_fit(attns, pri, blocks, info.prefix, info.swin)
    base = losses.prior_fit(attns, chance, blocks, info.prefix, info.swin)
    return logits.argmax(-1), [f.mean(0) for f in fit], [f.mean(0) for f in base]

  pred, fit, base = jax.device_get(run(params, images, result.priors,
                                       chance_priors(cfg, info, blocks, result.priors)))
  overall = lambda per_block: float(np.mean([f.mean() for f in per_block]))
  out = {"prior_fit": overall(fit), "prior_fit_chance": overall(base),
         "prior_fit_per_block": [np.round(f, 4).tolist() for f in fit],
         "prior_fit_chance_per_block": [np.round(f, 4).tolist() for f in base],
         "apa_blocks": list(blocks)}
  if cfg.class_guidance:  # without it (PSAQ-ViT V2) the drawn classes were never asked for
    out["class_fit"] = float((pred == result.classes).mean())
  if result.kept_patches is not None:  # SMI: what calibration sees, the kept tokens only
    keep = np.concatenate([np.tile(np.arange(info.prefix), (len(images), 1)),
                           result.kept_patches + info.prefix], axis=1)
    kpred = jax.jit(lambda p, x, k: module.apply({"params": p}, x, keep=k).argmax(-1))(
        params, images, jnp.asarray(keep))
    out["kept_class_fit"] = float((np.asarray(kpred) == result.classes).mean())
  if result.region_classes is not None:
    regs = regions.all_regions(images, cfg.msr_grid)
    rpred = jax.jit(lambda p, x: module.apply({"params": p}, x).argmax(-1))(
        params, regs.reshape((-1,) + regs.shape[2:]))
    out["region_class_fit"] = float((np.asarray(rpred) == result.region_classes.ravel()).mean())
  return out
