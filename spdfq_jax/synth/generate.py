"""The synthesis loop: one jitted, batch-sharded Adam step on the pixels, resumable.

Every random draw comes from a key derived from `cfg.seed` and the global image index (and
the step number), never from the batch position or the device, so 1, 4 or 8 devices, a
padded batch, or a run resumed from a checkpoint all give the same images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spdfq_jax import checkpoint, interrupt, parallel
from spdfq_jax.models import taps
from spdfq_jax.models import zoo
from spdfq_jax.synth import config as synth_config, losses, priors as priors_lib, regions

SUBDIR = "synthetic"
RESULT = "result.npz"
DIAGNOSTICS = "diagnostics.json"
CONFIG = "config.json"

# Stream ids, one per kind of randomness (priors use 3, see priors.py; steps fold 4 into
# the JAX key of the jitted step; 5 is the per-step plan).
_INIT, _LABELS, _STEPS, _PLAN = 1, 2, 4, 5


@dataclasses.dataclass
class SynthResult:
  """Synthetic calibration set. Images are NHWC and normalised; optimised images lie in the
  valid pixel range (the noise baseline is raw N(0, 1) unless `clamp_init`)."""
  images: np.ndarray  # (n, H, W, C) float32
  classes: np.ndarray  # (n,) int32 target class of each whole image
  targets: np.ndarray  # (n, num_classes) soft (SL) or one-hot targets
  region_classes: Optional[np.ndarray] = None  # (n, R) MSR classes
  region_targets: Optional[np.ndarray] = None  # (n, R, num_classes)
  # APA priors, one (n, heads, G) per APA block; drawn for every method (APA aligns to
  # them, the other methods are measured against them).
  priors: Optional[list[np.ndarray]] = None
  apa_blocks: tuple[int, ...] = ()  # 0-based block index of each prior
  diagnostics: dict = dataclasses.field(default_factory=dict)  # see `diagnostics`


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the losses need to know about the model's attention layout."""
  swin: bool
  prefix: int  # tokens before the patch tokens (CLS, distillation); 0 for Swin
  depth: int  # number of attention blocks L
  heads: tuple[int, ...]  # per block
  grid: tuple[int, ...]  # per block: patch-grid side (ViT) or window side (Swin)
  num_classes: int
  image_shape: tuple[int, int, int]


def model_info(module, params: Any, cfg: ml_collections.ConfigDict) -> ModelInfo:
  """Reads the layout by shape evaluation (no FLOPs) plus the module's fields."""
  swin = zoo.family(module) == "swin"
  size = cfg.image_size or module.img_size
  channels = cfg.channels or zoo.in_channels(module, params)
  shape = (int(size), int(size), int(channels))
  logits, attns, _ = jax.eval_shape(
      lambda p, x: taps.apply_with_attention(module, {"params": p}, x), params,
      jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
  prefix = 0 if swin else module.num_prefix_tokens
  grid = tuple(math.isqrt(a.shape[-1] - prefix) for a in attns)
  num_classes = cfg.num_classes or int(logits.shape[-1])
  return ModelInfo(swin, prefix, len(attns), tuple(int(a.shape[1]) for a in attns), grid,
                   num_classes, shape)


def apa_block_indices(info: ModelInfo, cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """0-based blocks that APA aligns (and every method is measured on): the deeper half
  (1-based l >= L/2) or all."""
  if cfg.apa_blocks == "all":
    return tuple(range(info.depth))
  if cfg.apa_blocks != "deep":
    raise ValueError(f"apa_blocks must be 'deep' or 'all', got {cfg.apa_blocks!r}")
  return tuple(l for l in range(info.depth) if l + 1 >= info.depth / 2)


def pixel_range(cfg: ml_collections.ConfigDict, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (lo, hi) of normalised images whose pixels lie in [0, 1]."""
  mean = np.broadcast_to(np.asarray(cfg.mean, np.float32), (channels,))
  std = np.broadcast_to(np.asarray(cfg.std, np.float32), (channels,))
  return (0 - mean) / std, (1 - mean) / std


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


def apa_maps(module, params: Any, images: jax.Array, info: ModelInfo,
             blocks: tuple[int, ...]) -> list[jax.Array]:
  """Achieved attention per APA block as (B, heads, G) (Swin: also averaged over windows)."""
  _, attns, _ = taps.apply_with_attention(module, {"params": params}, images)
  out = []
  for l in blocks:
    m = losses.achieved_maps(attns[l], info.prefix, info.swin, images.shape[0])
    out.append(m.mean(1) if info.swin else m)
  return out


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


def augment(x: jax.Array, shift: jax.Array, flip: jax.Array) -> jax.Array:
  """Rolls H and W by the same `shift` px, then flips W (horizontally) where `flip`.

  PSAQ-ViT's jitter: one offset for both axes and one flip per step for the whole batch.
  A batch-wide roll is a cheap dynamic slice (a per-image roll becomes a gather/scatter).
  """
  h, w = x.ndim - 3, x.ndim - 2
  x = jnp.roll(x, (shift, shift), axis=(h, w))
  return jnp.where(flip, jnp.flip(x, w), x)


def jitter_priors(priors: Sequence[jax.Array], shift: jax.Array, flip: jax.Array,
                  info: ModelInfo, blocks: tuple[int, ...]) -> list[jax.Array]:
  """The priors moved as `augment` moves the image: each (B, H, g * g) map rolled by
  round(shift / patch) cells on both grid axes (exact: the plan rolls by whole patches
  under `apa_follows_jitter`), then flipped along the width where `flip`, so that they
  cover the same image content as before the jitter."""
  out = []
  for l, prior in zip(blocks, priors):
    g = info.grid[l]
    cells = jnp.round(shift / (info.image_shape[0] // g)).astype(jnp.int32)
    m = jnp.roll(prior.reshape(prior.shape[:-1] + (g, g)), (cells, cells), axis=(-2, -1))
    m = jnp.where(flip, jnp.flip(m, -1), m)
    out.append(m.reshape(prior.shape))
  return out


def loss_terms(module, params: Any, x: jax.Array, fixed: dict, row: dict,
               cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...]
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """(terms, stats): weighted loss terms (batch means over valid images), whose sum is the
  objective, and what is watched but not optimised (`prior_fit`, the mean Pearson
  correlation of the APA maps with their priors).

  `row` is one step of the `Plan` (shift, flip, region_shift, region_flip, tv_target,
  step). Every whole-image term, TV included, reads the jittered image, as in PSAQ-ViT.
  """
  n_valid = jnp.maximum(fixed["mask"].sum(), 1.0)
  xa = augment(x, row["shift"], row["flip"])
  terms, stats = model_terms(module, params, x, xa, fixed, row, cfg, info, blocks, n_valid)
  return {**terms, **pixel_terms(xa, fixed["mask"], row, cfg)}, stats


def model_terms(module, params: Any, x: jax.Array, xa: jax.Array, fixed: dict, row: dict,
                cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...],
                n_valid: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The terms that run the model on `x` and its jittered copy `xa`: sums over the valid
  images divided by `n_valid` (the whole batch's count), so the terms of disjoint parts of
  a batch add up to the batch's (except the entropy with the batch-wide KDE grid, which
  couples the images)."""
  b = x.shape[0]
  mask = fixed["mask"]
  mean = lambda v: (v * mask).sum() / n_valid
  terms = {}
  if cfg.apa or cfg.entropy:
    logits, attns, attn_vs = taps.apply_with_attention(module, {"params": params}, xa)
  else:
    logits = module.apply({"params": params}, xa)
  terms["ce"] = mean(losses.soft_cross_entropy(logits, fixed["targets"]))
  stats = {}
  if cfg.apa:
    priors = fixed["priors"]
    if cfg.apa_follows_jitter:
      priors = jitter_priors(priors, row["shift"], row["flip"], info, blocks)
    weights = losses.depth_weights(blocks, info.depth, cfg.depth_weight)
    per = losses.apa_loss(attns, priors, blocks, weights, info.prefix, info.swin)
    terms["apa"] = cfg.alpha1 * mean(per)
    fit = losses.prior_fit(attns, priors, blocks, info.prefix, info.swin)
    stats["prior_fit"] = jax.lax.stop_gradient(mean(sum(f.mean(-1) for f in fit) / len(fit)))
  if cfg.entropy:
    per = losses.patch_entropy_loss(attn_vs, info.heads, entropy_skip(cfg, info), b,
                                    cfg.entropy_bandwidth, cfg.entropy_points,
                                    mask if cfg.entropy_grid == "batch" else None)
    terms["entropy"] = cfg.entropy_weight * mean(per)
  if cfg.msr:
    reg = regions.all_regions(x, cfg.msr_grid)  # (B, R, H, W, C)
    r = reg.shape[1]
    # Region choice per image, keyed by (step, image index): independent of the layout.
    k_sel = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), _STEPS),
                               row["step"])
    sel = jax.vmap(lambda i: regions.select_regions(jax.random.fold_in(k_sel, i), r, cfg.k_msr)
                   )(fixed["index"])  # (B, R)
    reg = augment(reg, row["region_shift"], row["region_flip"])
    rlogits = module.apply({"params": params}, reg.reshape((b * r,) + reg.shape[2:]))
    ce = losses.soft_cross_entropy(rlogits, fixed["region_targets"].reshape(b * r, -1))
    terms["msr"] = mean((ce.reshape(b, r) * sel).sum(-1))
  return terms, stats


def pixel_terms(xa: jax.Array, mask: jax.Array, row: dict, cfg: ml_collections.ConfigDict
                ) -> dict[str, jax.Array]:
  """The terms on the (jittered) pixels alone: PSAQ-ViT's batch TV, which couples the
  images."""
  if not cfg.tv_weight:
    return {}
  tv = losses.tv_batch(xa, mask)
  return {"tv": cfg.tv_weight * (jnp.abs(tv - row["tv_target"]) if cfg.tv_mode == "target"
                                 else tv)}


def entropy_skip(cfg: ml_collections.ConfigDict, info: ModelInfo) -> int:
  """Tokens dropped before the patch similarities: the prefix tokens (ViT/DeiT); for Swin
  token 0 of every window (PSAQ-ViT's `[:, 1:]`), or none with `entropy_swin_all_tokens`."""
  if info.swin:
    return 0 if cfg.entropy_swin_all_tokens else 1
  return info.prefix


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


def check_runtime(cfg: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, on settings the step cannot run."""
  for field, allowed in (("entropy_grid", ("batch", "image")), ("tv_mode", ("target", "min")),
                         ("compute_dtype", tuple(COMPUTE_DTYPES))):
    if cfg[field] not in allowed:
      raise ValueError(f"synth.{field} must be one of {allowed}, got {cfg[field]!r}")
  for field in ("log_every", "microbatches"):
    if not isinstance(cfg[field], int) or cfg[field] < 1:
      raise ValueError(f"synth.{field} must be an integer >= 1, got {cfg[field]!r}")
  if cfg.microbatches > 1 and cfg.entropy:
    # The batch grid couples all images; with the per-image grid the split was measured to
    # move the images by up to 2e-3 in 4 steps, unexplained, so it is refused too.
    raise ValueError("synth.microbatches > 1 cannot split PSAQ-ViT's entropy term (its KDE "
                     "grid spans the batch): set synth.microbatches=1 for methods with "
                     "synth.entropy on (psaq), or use synth.remat to save memory.")


COMPUTE_DTYPES = {"float32": None, "bfloat16": "bfloat16"}


def step_module(module, cfg: ml_collections.ConfigDict):
  """The model as the step runs it: matmuls in `compute_dtype`, blocks rematerialised with
  `remat` (same parameters, same function up to the matmuls' rounding)."""
  return module.clone(matmul_dtype=COMPUTE_DTYPES[cfg.compute_dtype], remat=bool(cfg.remat))


def _split(tree: Any, parts: int) -> Any:
  """(B, ...) leaves -> (parts, B / parts, ...): part j holds images j, j + parts, ...,
  so each part keeps the batch's spread over the devices."""
  return jax.tree_util.tree_map(
      lambda a: a.reshape((a.shape[0] // parts, parts) + a.shape[1:]).swapaxes(0, 1), tree)


def _merge(a: jax.Array) -> jax.Array:
  """Inverse of `_split` for one array."""
  return a.swapaxes(0, 1).reshape((-1,) + a.shape[2:])


def _sum_grad(fn: Callable, x: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
  """(d sum(terms) / dx, (terms, stats)) of `fn(x) -> (terms, stats)`."""
  def objective(x):
    terms, stats = fn(x)
    return sum(terms.values()), (terms, stats)
  return jax.grad(objective, has_aux=True)(x)


def _total(per_part: dict) -> dict:
  return {k: v.sum(0) for k, v in per_part.items()}


def make_step(module, cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...],
              mesh) -> Callable:
  """The jitted step (params, x, adam, fixed, table, t, log) -> (x, adam, t + 1, log): one
  Adam update of the pixels at step t's lr (`table` = `Plan.table()` on the device), every
  channel then clipped to its valid pixel range, and the step's {'terms', 'stats'} written
  to row t % K of the (K,)-long `log` buffers. Nothing leaves the device.

  With `microbatches` M > 1 the model terms and their gradient are computed on M parts of
  the batch in sequence (memory of one part); the batch TV is computed on the whole batch.
  """
  check_runtime(cfg)
  if cfg.apa and cfg.apa_follows_jitter and info.swin:
    raise ValueError("synth.apa_follows_jitter needs a ViT/DeiT: a rolled Swin image changes "
                     "which tokens share a window, so its window priors cannot follow it; "
                     "set synth.apa_follows_jitter=False for Swin.")
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
  lo, hi = pixel_range(cfg, info.image_shape[-1])
  net = step_module(module, cfg)
  parts = cfg.microbatches

  def gradient(params, x, fixed, row):
    if parts == 1:
      return _sum_grad(lambda x: loss_terms(net, params, x, fixed, row, cfg, info, blocks), x)
    n_valid = jnp.maximum(fixed["mask"].sum(), 1.0)
    jitter = lambda x: augment(x, row["shift"], row["flip"])
    part = lambda _, xf: (None, _sum_grad(lambda x: model_terms(
        net, params, x, jitter(x), xf[1], row, cfg, info, blocks, n_valid), xf[0]))
    _, (grads, (terms, stats)) = jax.lax.scan(part, None, _split((x, fixed), parts))
    grad, terms, stats = _merge(grads), _total(terms), _total(stats)
    if cfg.tv_weight:
      g_pix, (pix, _) = _sum_grad(
          lambda x: (pixel_terms(jitter(x), fixed["mask"], row, cfg), {}), x)
      grad, terms = grad + g_pix, {**terms, **pix}
    return grad, (terms, stats)

  def step(params, x, opt_state, fixed, table, t, log):
    row = plan_row(table, t)
    grad, (terms, stats) = gradient(params, x, fixed, row)
    updates, opt_state = adam.update(grad, opt_state)
    x = jnp.clip(x - row["lr"] * updates, lo, hi)
    k = jax.tree_util.tree_leaves(log)[0].shape[0]
    log = jax.tree_util.tree_map(lambda buf, v: buf.at[t % k].set(v), log,
                                 {"terms": terms, "stats": stats})
    return x, opt_state, t + 1, log

  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  opt_sh = optax.ScaleByAdamState(count=rep, mu=batch, nu=batch)
  return jax.jit(step, in_shardings=(rep, batch, opt_sh, batch, rep, rep, rep),
                 out_shardings=(batch, opt_sh, rep, rep), donate_argnums=(1, 2, 5, 6))


def empty_log(module, params: Any, x: Any, fixed: dict, table: dict,
              cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...]
              ) -> dict:
  """Zeroed host buffers for the step's log: (log_every,) per term and stat."""
  terms, stats = jax.eval_shape(
      lambda p, x, f, tb: loss_terms(module, p, x, f, plan_row(tb, 0), cfg, info, blocks),
      params, x, fixed, table)
  zeros = lambda s: np.zeros((cfg.log_every,) + s.shape, s.dtype)
  return jax.tree_util.tree_map(zeros, {"terms": terms, "stats": stats})


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

  class_fit: share of images (and of MSR regions) the FP model assigns to their target.
  prior_fit: Pearson correlation of each APA block's achieved maps (CLS rows; Swin: per
  window) with the image's priors, mean over images, per block and head, and overall;
  prior_fit_chance: the same against priors the images never saw.
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
  out = {"class_fit": float((pred == result.classes).mean()),
         "prior_fit": overall(fit), "prior_fit_chance": overall(base),
         "prior_fit_per_block": [np.round(f, 4).tolist() for f in fit],
         "prior_fit_chance_per_block": [np.round(f, 4).tolist() for f in base],
         "apa_blocks": list(blocks)}
  if result.region_classes is not None:
    regs = regions.all_regions(images, cfg.msr_grid)
    rpred = jax.jit(lambda p, x: module.apply({"params": p}, x).argmax(-1))(
        params, regs.reshape((-1,) + regs.shape[2:]))
    out["region_class_fit"] = float((np.asarray(rpred) == result.region_classes.ravel()).mean())
  return out


def _config_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(synth_config.identity(cfg), sort_keys=True)


def save_result(directory: str, result: SynthResult, cfg: ml_collections.ConfigDict) -> None:
  """diagnostics.json, then the npz (images, labels, priors, diagnostics), each written
  atomically; the npz last, since a resume takes its presence for a finished set."""
  arrays = {"images": result.images, "classes": result.classes, "targets": result.targets,
            "apa_blocks": np.asarray(result.apa_blocks, np.int32)}
  if result.region_classes is not None:
    arrays["region_classes"] = result.region_classes
    arrays["region_targets"] = result.region_targets
  for j, p in enumerate(result.priors or []):
    arrays[f"prior_{j}"] = p
  arrays["diagnostics"] = np.asarray(json.dumps(result.diagnostics))
  checkpoint.write_text(os.path.join(directory, DIAGNOSTICS),
                        json.dumps(result.diagnostics, indent=1))
  with checkpoint.atomic_path(os.path.join(directory, RESULT)) as tmp:
    np.savez(tmp, **arrays)


def load_result(path: str) -> SynthResult:
  """Reads a `result.npz` written by `generate`."""
  z = np.load(path)
  pri = [z[f"prior_{j}"] for j in range(len([k for k in z.files if k.startswith("prior_")]))]
  return SynthResult(z["images"], z["classes"], z["targets"],
                     z["region_classes"] if "region_classes" in z.files else None,
                     z["region_targets"] if "region_targets" in z.files else None,
                     pri or None, tuple(int(v) for v in z["apa_blocks"]),
                     json.loads(str(z["diagnostics"])) if "diagnostics" in z.files else {})


def _check_config(directory: str, cfg: ml_collections.ConfigDict) -> None:
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


def _finite_or_raise(start: int, terms: dict[str, np.ndarray]) -> None:
  """Raises at the first step of a fetched block (rows from step `start`) with a
  non-finite term, naming the step and the terms."""
  bad = ~np.isfinite(np.stack(list(terms.values()), -1)).all(-1)
  if bad.any():
    i = int(np.argmax(bad))
    row = {k: float(v[i]) for k, v in terms.items()}
    detail = ", ".join(f"{k}={v}" for k, v in row.items() if not math.isfinite(v))
    raise FloatingPointError(f"synthesis loss is not finite at step {start + i}: {detail} "
                             f"(all terms: {row})")


def generate(module, params: Any, cfg: ml_collections.ConfigDict, *,
             workdir: Optional[str] = None, progress: bool = True,
             real_images: Optional[np.ndarray] = None,
             callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> SynthResult:
  """Synthesises `cfg.num_images` calibration images against the FP model.

  With a workdir the run saves Orbax checkpoints every `cfg.checkpoint_every` steps into
  `workdir/synthetic/`, resumes from the newest one, and writes result.npz, config.json,
  grid.png and attention.png there; a finished run is loaded instead of recomputed.
  `real_images` feed `cfg.prior='real'`; `callback(step, terms)` runs once per step, in
  order, when the loop reads the device (every `cfg.log_every` steps and at checkpoints).
  """
  directory = None
  if workdir is not None:
    directory = os.path.join(workdir, SUBDIR)
    os.makedirs(directory, exist_ok=True)
    _check_config(directory, cfg)
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
  if cfg.method != "noise":
    fixed = {"targets": labels["targets"], "region_targets": labels["region_targets"],
             "priors": pri if cfg.apa else []}
    result.images = optimise(module, params, cfg, info, blocks, x0, fixed, make_plan(cfg, info),
                             directory=directory, progress=progress, callback=callback)
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
             callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> np.ndarray:
  """Runs `plan` from `x0` with ONE Adam optimiser for all rounds (PSAQ-ViT: only the lr
  schedule restarts with a round); returns the final images.

  `fixed` holds per-image `targets`, `region_targets` and `priors` (the APA blocks').
  With a `directory`, checkpoints there every `cfg.checkpoint_every` steps and resumes
  from the newest one; on SIGTERM (`interrupt`) it checkpoints after the current step and
  raises `interrupt.Stopped`.
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
  step_fn = make_step(module, cfg, info, blocks, mesh)
  log = jax.device_put(empty_log(module, params, pad(x0), fixed, table, cfg, info, blocks), rep)
  total = len(plan.lr)

  def to_device(x, mu, nu, count):
    x = parallel.shard_batch(pad(x), mesh)
    st = optax.ScaleByAdamState(count=jax.device_put(np.int32(count), rep),
                                mu=parallel.shard_batch(pad(mu), mesh),
                                nu=parallel.shard_batch(pad(nu), mesh))
    return x, st

  mgr, start = None, 0
  x, opt_state = to_device(x0, np.zeros_like(x0), np.zeros_like(x0), 0)
  if directory is not None:
    mgr = checkpoint.manager(os.path.join(directory, "checkpoints"))
    like = {"images": x0, "mu": x0, "nu": x0, "count": np.zeros((), np.int32),
            "step": np.zeros((), np.int32)}
    restored = checkpoint.restore_latest(mgr, like)
    if restored is not None:
      _, s = restored
      start = int(s["step"])
      x, opt_state = to_device(s["images"], s["mu"], s["nu"], int(s["count"]))
  t = jax.device_put(np.int32(start), rep)

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc=f"synth[{cfg.method}]", leave=False)
  try:
    saves = cfg.checkpoint_every if mgr is not None else total
    for first, end in fetch_points(start, total, cfg.log_every, saves):
      stop = False
      for s in range(first, end):
        x, opt_state, t, log = step_fn(params, x, opt_state, fixed, table, t, log)
        if interrupt.requested() and s + 1 < total:  # SIGTERM: save after this step, stop
          end, stop = s + 1, True
          break
      # The block's steps sit in rows first % K .. (end - 1) % K: one fetch for all of them.
      rows = slice(first % cfg.log_every, first % cfg.log_every + end - first)
      got = jax.device_get(log)
      _finite_or_raise(first, {k: v[rows] for k, v in got["terms"].items()})
      values = {k: v[rows] for k, v in {**got["terms"], **got["stats"]}.items()}
      if bar is not None:
        bar.set_postfix({k: f"{v[-1]:.4g}" for k, v in values.items()}, refresh=False)
        bar.update(end - first)
      if callback is not None:
        for i in range(end - first):
          callback(first + i, {k: float(v[i]) for k, v in values.items()})
      stop = stop or (interrupt.requested() and end < total)  # also one that came meanwhile
      if mgr is not None and (end % cfg.checkpoint_every == 0 or stop) and end < total:
        checkpoint.save(mgr, end, {  # global arrays: every process writes its own rows
            "images": x[:n], "mu": opt_state.mu[:n], "nu": opt_state.nu[:n],
            "count": opt_state.count, "step": np.asarray(end, np.int32)})
      if stop:
        raise interrupt.Stopped(f"synthesis ({cfg.method})", end)
  finally:
    if bar is not None:
      bar.close()
  return parallel.to_host(x)[:n].astype(np.float32)


def fetch_points(start: int, total: int, every: int, checkpoint_every: int
                 ) -> list[tuple[int, int]]:
  """Blocks [first, end) of steps run without looking at the device: they end at every
  multiple of `every` (the log buffer's length) and of `checkpoint_every`, and at `total`."""
  ends = sorted({e for e in range(start + 1, total + 1)
                 if e % every == 0 or e % checkpoint_every == 0 or e == total})
  return list(zip([start] + ends[:-1], ends))
