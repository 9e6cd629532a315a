"""The step plan: every per-step value of a run (learning rate, jitter offsets and flips,
the TV target), drawn on the host from the seed before the first step."""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from spdfq_jax.synth import losses
from spdfq_jax.synth.layout import ModelInfo

# Stream ids, one per kind of randomness, kept apart across the package: 1 initial images
# and 2 labels (draws.py), 3 priors (priors.py), 4 the steps' JAX key (objective.py),
# 5 the per-step plan (plan.py), 6 SMI's per-step plan (smi.py), 7 MimiQ's per-step plan
# and 8 its per-(step, image) augmentation key (mimiq.py).
_PLAN = 5


def lr_schedule(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """(iterations,) learning rate: per round, PSAQ-ViT's `lr_cosine_policy`.

  Step t of a round: base * (t + 1) / warmup while t < warmup, then
  base * (1 + cos(pi * (t - warmup) / (per_round - warmup))) / 2.
  """
  per_round = cfg.iterations // cfg.rounds
  t = np.arange(per_round, dtype=np.float64)
  warm = cfg.warmup
  cosine = 0.5 * (1 + np.cos(np.pi * (t - warm) / max(per_round - warm, 1)))
  lr = cfg.lr * np.where(t < warm, (t + 1) / max(warm, 1), cosine)
  return np.tile(lr, cfg.rounds).astype(np.float32)


def jitter_limit(cfg: ml_collections.ConfigDict, round_index: int, size: int) -> int:
  j = cfg.jitter[min(round_index, len(cfg.jitter) - 1)]
  return int(round(j * size / cfg.jitter_reference)) if cfg.jitter_reference else int(j)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every per-step value of a run, drawn on the host before the first step.

  PSAQ-ViT draws the roll offset (`random.randint(-lim, lim)`, both axes), the flip
  (p 0.5) and the TV target (U(2500, 3000), once per run) with python's `random` inside
  its loop; here they are a function of the seed only, so a resumed or re-sharded run
  replays them exactly, and a test can replay a recorded sequence.
  """
  lr: np.ndarray  # (T,) float32
  shift: np.ndarray  # (T,) int32, roll of H and W
  flip: np.ndarray  # (T,) bool
  region_shift: np.ndarray  # (T,) int32, the MSR regions' own roll
  region_flip: np.ndarray  # (T,) bool
  tv_target: float  # scaled to this batch and image size when `tv_target_scaled`

  def table(self) -> dict[str, np.ndarray]:
    """Every step's row at once, (T,) per field: sent to the device once per run."""
    t = len(self.lr)
    return {"step": np.arange(t, dtype=np.int32), "lr": self.lr.astype(np.float32),
            "shift": self.shift.astype(np.int32), "flip": self.flip.astype(np.bool_),
            "region_shift": self.region_shift.astype(np.int32),
            "region_flip": self.region_flip.astype(np.bool_),
            "tv_target": np.full(t, self.tv_target, np.float32)}

  def row(self, step: int) -> dict[str, np.ndarray]:
    return plan_row(self.table(), step)


def plan_row(table: dict, step: Any) -> dict:
  """Row `step` of a plan table; `step` may be a traced index into a table on the device."""
  return {k: v[step] for k, v in table.items()}


def make_plan(cfg: ml_collections.ConfigDict, info: ModelInfo) -> Plan:
  """The run's `Plan`: lr schedule, jitter offsets and flips per step, the TV target."""
  if cfg.iterations % cfg.rounds:
    raise ValueError(f"iterations ({cfg.iterations}) must split evenly into {cfg.rounds} rounds")
  per_round = cfg.iterations // cfg.rounds
  size = info.image_shape[0]
  limit = np.repeat([jitter_limit(cfg, r, size) for r in range(cfg.rounds)], per_round)
  g = np.random.default_rng([cfg.seed, _PLAN])
  shift = g.integers(-limit, limit + 1).astype(np.int32)
  if cfg.apa and cfg.apa_follows_jitter:  # whole patches, so the priors can follow exactly
    patch = size // info.grid[0]
    shift = (patch * np.round(shift / patch)).astype(np.int32)
  flip = (g.random(cfg.iterations) < 0.5) & cfg.flip
  region_shift = g.integers(-limit, limit + 1).astype(np.int32)
  region_flip = (g.random(cfg.iterations) < 0.5) & cfg.flip
  lo, hi = cfg.tv_target
  tv_target = g.uniform(lo, hi)
  if cfg.tv_target_scaled:
    tv_target *= losses.tv_target_scale(cfg.num_images, info.image_shape)
  return Plan(lr_schedule(cfg), shift, flip, region_shift, region_flip, float(tv_target))
