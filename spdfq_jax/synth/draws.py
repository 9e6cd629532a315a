"""What a run draws once, before the first step: the initial images, the classes and
targets of images and MSR regions, and the APA priors. Every draw is a function of
(seed, stream, image index), never of the batch position or the device."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spdfq_jax.synth import losses, priors as priors_lib
from spdfq_jax.synth.layout import ModelInfo, pixel_range
from spdfq_jax.synth.objective import apa_maps

# Stream ids, one per kind of randomness, kept apart across the package: 1 initial images
# and 2 labels (draws.py), 3 priors (priors.py), 4 the steps' JAX key (objective.py),
# 5 the per-step plan (plan.py), 6 SMI's per-step plan (smi.py), 7 MimiQ's per-step plan
# and 8 its per-(step, image) augmentation key (mimiq.py).
_INIT, _LABELS = 1, 2


def _rng(cfg: ml_collections.ConfigDict, stream: int, index: int) -> np.random.Generator:
  """Host generator of one image's draws in one stream: a function of (seed, stream, index)."""
  return np.random.default_rng([cfg.seed, stream, index])


def initial_images(cfg: ml_collections.ConfigDict, info: ModelInfo) -> np.ndarray:
  """N(0, 1) in normalised space: the noise baseline and every loop's start.

  Not clamped, as in PSAQ-ViT (the loop clips after each step); `clamp_init` clamps it.
  """
  x = np.stack([_rng(cfg, _INIT, i).standard_normal(info.image_shape, np.float32)
                for i in range(cfg.num_images)])
  if cfg.clamp_init:
    lo, hi = pixel_range(cfg, info.image_shape[-1])
    x = np.clip(x, lo, hi)
  return x.astype(np.float32)


def draw_labels(cfg: ml_collections.ConfigDict, info: ModelInfo) -> dict[str, np.ndarray]:
  """Classes and targets of whole images and MSR regions, fixed for the run.

  Without SL the targets are one-hot; with SL `losses.soft_targets`: softmax(Z), Z =
  U(soft_label_range) at the class and 0 elsewhere. A region's target is built from that
  region's own class and z. Region classes are fixed per (image, region) (open: not
  redrawn each step).
  """
  r, c = cfg.msr_grid ** 2, info.num_classes
  lo, hi = cfg.soft_label_range
  cls, z, rcls, rz = [], [], [], []
  for i in range(cfg.num_images):
    g = _rng(cfg, _LABELS, i)
    cls.append(g.integers(0, c))
    z.append(g.uniform(lo, hi))
    rcls.append(g.integers(0, c, r))
    rz.append(g.uniform(lo, hi, r))
  cls, rcls = np.asarray(cls, np.int32), np.asarray(rcls, np.int32)
  z, rz = np.asarray(z, np.float32), np.asarray(rz, np.float32)
  if cfg.sl:
    extra = None
    if cfg.whole_target_has_regions and cfg.msr:
      extra = losses.soft_label_logits(rcls, c, rz).sum(1)
    targets = losses.soft_targets(cls, c, z, extra)
    rtargets = losses.soft_targets(rcls, c, rz)
  else:
    targets, rtargets = jax.nn.one_hot(cls, c), jax.nn.one_hot(rcls, c)
  return {"classes": cls, "targets": np.asarray(targets, np.float32),
          "region_classes": rcls, "region_targets": np.asarray(rtargets, np.float32)}


def draw_priors(module, params: Any, cfg: ml_collections.ConfigDict, info: ModelInfo,
                blocks: tuple[int, ...], real_images: Optional[np.ndarray]) -> list[np.ndarray]:
  """APA priors per (image, block, head): random mixtures, or real images' attention."""
  if cfg.prior == priors_lib.REAL:
    if real_images is None:
      raise ValueError("cfg.prior='real' needs real_images=... (normalised, NHWC).")
    idx = np.arange(cfg.num_images) % len(real_images)
    fn = jax.jit(lambda p, x: apa_maps(module, p, x, info, blocks))
    return [np.asarray(m, np.float32) for m in fn(params, jnp.asarray(real_images[idx]))]
  layout = [(info.heads[l], info.grid[l]) for l in blocks]
  return priors_lib.draw_priors(cfg.seed, np.arange(cfg.num_images), layout, cfg.k_apa,
                                tuple(cfg.sigma_range), cfg.prior)

