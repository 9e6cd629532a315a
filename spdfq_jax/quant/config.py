"""Quantization settings: a ConfigDict for users, frozen specs for the model's points.

Presets (the quantization stage of the method, cumulative):
  'calib'    calibration only: per-tensor activation ranges everywhere;
  'reparam'  + per-channel ranges at post-LayerNorm inputs, folded into the LayerNorm and the
             next layer (RepQ-ViT scale reparameterisation), deployed per tensor;
  'full'     + block-wise reconstruction (default, the strongest setting).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Sequence

import ml_collections

from spdfq_jax.quant import quantizers

PRESETS = ("calib", "reparam", "full")
METHODS = ("percentile_mse", "minmax", "percentile", "mse")
SOFTMAX_QUANTIZERS = ("ias_log2", "log2", "log_sqrt2", "shift_log2", "uniform")
CALIB_ORDERS = ("sequential", "fp")
RECON_STAGES = ("both", "final")
RECON_TRAIN = ("no_norm", "all", "kernels")
RECON_LOSSES = ("sum_dim1", "mean")

# Flat keyword shortcuts accepted by `default_config`, besides dotted paths.
SHORTCUTS = {
    "recon_iters": "recon.iters", "recon_batch_size": "recon.batch_size", "recon_lr": "recon.lr",
    "recon_train": "recon.train",
    "seed": "recon.seed", "chunk_size": "calib.chunk_size",
    "w_method": "weights.method", "w_granularity": "weights.granularity",
    "a_method": "acts.method", "a_granularity": "acts.granularity",
    "post_ln_granularity": "acts.post_ln_granularity", "percentile": "acts.percentile",
    "softmax_quantizer": "softmax.quantizer", "softmax_bits": "softmax.bits",
    "keep_fp": "keep_fp", "reparam": "reparam", "recon_stages": "recon.stages",
    "recon_loss": "recon.loss", "calib_order": "calib.order",
}


def default_config(w_bits: int = 4, a_bits: int = 4, preset: str = "full",
                   **overrides: Any) -> ml_collections.ConfigDict:
  """Settings for W{w_bits}A{a_bits}; overrides are dotted paths ('acts.method') or the
  flat shortcuts in SHORTCUTS (recon_iters=0, a_method='percentile', keep_fp=['head*'])."""
  quantizers.check_bits(w_bits)
  quantizers.check_bits(a_bits)
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  # Defaults are I&S-ViT's (docs/quantization.md); the other values are its deviation table.
  # Weights: asymmetric, per output channel (last axis of every kernel); range by the
  # percentile-pair search ('percentile_mse', candidates below; Q8) or min/max, one
  # percentile, or MSE over `grid` shrink ratios of [min, max].
  c.weights = dict(bits=w_bits, granularity="channel", method="percentile_mse", symmetric=False,
                   percentile=99.99, grid=40, candidates=quantizers.WEIGHT_CANDIDATES)
  # Activations at every linear input and both attention-matmul operands (Q2). The methods
  # other than 'percentile_mse' widen the range to include 0 and clip the zero point.
  # reduction_post_ln: Swin's patch-merging input calibrated per channel and folded like
  # the blocks' post-LayerNorm inputs (Q4; I&S-ViT keeps it per tensor).
  c.acts = dict(bits=a_bits, granularity="tensor", method="percentile_mse", symmetric=False,
                percentile=99.99, grid=20, candidates=quantizers.ACT_CANDIDATES,
                post_ln_granularity="channel" if preset != "calib" else "tensor",
                reduction_post_ln=False)
  # Post-softmax attention (Q5): ias_log2 (I&S-ViT's, shift searched), log2, log_sqrt2
  # (RepQ-ViT), shift_log2 (uniform in -log2(x + shift)) or uniform.
  # bits None = the activation bits; shift None = searched by MSE at calibration.
  c.softmax = dict(bits=None, quantizer="ias_log2", method="minmax", shift=None)
  # fnmatch patterns over '/'-joined paths of points and kernels kept in full precision.
  # Default: the patch-embedding input (the image; Q6), as I&S-ViT.
  c.keep_fp = ["patch_in"]
  c.reparam = preset != "calib"
  # Q7: the folded zero point is the mean of the per-channel ones (I&S-ViT); True rounds it.
  c.reparam_round_zero = False
  # order (Q1): 'sequential' calibrates each point on the already-quantized upstream in one
  # forward of the first `max_images` images (I&S-ViT); 'fp' observes every point on the FP
  # model over all images, `chunk_size` at a time (searches over percentiles read all at once).
  c.calib = dict(chunk_size=32, order="sequential", max_images=64)
  # Block-wise reconstruction: iterations per unit (0 = off), Adam with cosine decay.
  # stages (Q9): 'both' = after activation calibration (FP weights, FP inputs) and again
  # after weight quantization (I&S-ViT); 'final' = only the latter.
  # train (Q10): 'no_norm' = every param of the unit but LayerNorm affine, class/distillation
  # token and position table (I&S-ViT); 'all'; 'kernels'.
  # loss (Q11): 'sum_dim1' = squared error summed over axis 1, averaged (I&S-ViT); 'mean'.
  # log_every: steps between reads of the losses (each read waits for the device).
  c.recon = dict(iters=100 if preset == "full" else 0, batch_size=64, lr=4e-5, seed=0,
                 stages="both", train="no_norm", loss="sum_dim1", log_every=50)
  for key, value in overrides.items():
    _set(c, SHORTCUTS.get(key, key), value)
  validate(c)
  return c


def identity(c: ml_collections.ConfigDict) -> dict:
  """The fields that decide the quantized model: the config without `recon.log_every`
  (how often the loop reads its losses)."""
  d = c.to_dict()
  d["recon"] = {k: v for k, v in d["recon"].items() if k != "log_every"}
  return d


def _set(c: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    if p not in node:
      raise ValueError(f"unknown quantization setting {path!r}; shortcuts: {sorted(SHORTCUTS)}")
    node = node[p]
  if leaf not in node:
    raise ValueError(f"unknown quantization setting {path!r}; shortcuts: {sorted(SHORTCUTS)}")
  node[leaf] = list(value) if isinstance(value, tuple) else value


def validate(c: ml_collections.ConfigDict) -> None:
  """Fails early, with the offending field, instead of deep inside a jitted function."""
  for name, bits in (("weights.bits", c.weights.bits), ("acts.bits", c.acts.bits),
                     ("softmax.bits", c.softmax.bits)):
    if bits is not None or name != "softmax.bits":
      try:
        quantizers.check_bits(bits)
      except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
  for name, node in (("weights", c.weights), ("acts", c.acts)):
    if node.method not in METHODS:
      raise ValueError(f"{name}.method must be one of {METHODS}, got {node.method!r}")
    if node.granularity not in quantizers.GRANULARITIES:
      raise ValueError(f"{name}.granularity must be one of {quantizers.GRANULARITIES}")
  if c.weights.granularity == "token":
    raise ValueError("weights.granularity must be 'channel' or 'tensor'")
  if c.acts.post_ln_granularity not in quantizers.GRANULARITIES:
    raise ValueError(f"acts.post_ln_granularity must be one of {quantizers.GRANULARITIES}")
  if c.softmax.quantizer not in SOFTMAX_QUANTIZERS:
    raise ValueError(f"softmax.quantizer must be one of {SOFTMAX_QUANTIZERS}")
  for name, value, allowed in (("recon.train", c.recon.train, RECON_TRAIN),
                               ("recon.stages", c.recon.stages, RECON_STAGES),
                               ("recon.loss", c.recon.loss, RECON_LOSSES),
                               ("calib.order", c.calib.order, CALIB_ORDERS)):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  if c.calib.max_images < 1:
    raise ValueError("calib.max_images must be >= 1")
  if c.recon.iters < 0 or c.recon.batch_size < 1 or c.recon.log_every < 1:
    raise ValueError("recon.iters must be >= 0, recon.batch_size and recon.log_every >= 1")
  if c.reparam and c.acts.post_ln_granularity != "channel":
    raise ValueError("reparam folds per-channel post-LN ranges: set "
                     "acts.post_ln_granularity='channel' (or reparam=False)")


@dataclasses.dataclass(frozen=True)
class PointSpec:
  """What one quant point does (hashable, so it can live in a Flax module field)."""
  quantizer: str  # 'uniform' | 'log2' | 'log_sqrt2' | 'shift_log2' | 'none'
  bits: int = 8
  granularity: str = "tensor"
  method: str = "minmax"
  symmetric: bool = False
  percentile: float = 99.99
  grid: int = 20
  shift: float | None = None
  candidates: tuple = ()

  @property
  def dynamic(self) -> bool:
    return self.quantizer == "uniform" and self.granularity == "token"


def keep_fp(patterns: Sequence[str], path: str) -> bool:
  """Whether a '/'-joined path, or any prefix of it, matches a full-precision pattern."""
  parts = path.split("/")
  prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
  return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def point_spec(c: ml_collections.ConfigDict, kind: str, path: str) -> PointSpec:
  """The spec of the point of `kind` at `path` ('blocks_0/attn/qkv_in')."""
  if keep_fp(c.keep_fp, path):
    return PointSpec("none")
  a = c.acts
  if kind == "softmax":
    s = c.softmax
    bits = s.bits if s.bits is not None else a.bits
    if s.quantizer == "uniform":
      return PointSpec("uniform", bits, "tensor", s.method, False, a.percentile, a.grid,
                       candidates=tuple(a.candidates))
    return PointSpec(s.quantizer, bits, "tensor", s.method, shift=s.shift)
  if kind == "post_ln" and path.endswith("reduction_in") and not a.reduction_post_ln:
    kind = "act"
  gran = a.post_ln_granularity if kind == "post_ln" else a.granularity
  return PointSpec("uniform", a.bits, gran, a.method, a.symmetric, a.percentile, a.grid,
                   candidates=tuple(a.candidates))


def weight_spec(c: ml_collections.ConfigDict, path: str) -> PointSpec:
  """The spec of a kernel at `path` ('blocks_0/attn/qkv/kernel')."""
  if keep_fp(c.keep_fp, path):
    return PointSpec("none")
  w = c.weights
  return PointSpec("uniform", w.bits, w.granularity, w.method, w.symmetric, w.percentile, w.grid,
                   candidates=tuple(w.candidates))
