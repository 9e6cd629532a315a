"""MimiQ (Choi et al., AAAI 2025): images whose attention heads look alike, following its
generation script as it survives in github hfutqian/MaskAQ at 3245400
(`MaskAQ/hydra_image_gen_ssim_att_map.py`, `MaskAQ/image_gen_aug_utils.py`; the attention
forward it hooks is `MaskAQ/quant_utils/quant_modules.py`'s).

The loop, as the script runs it (docs/synthesis.md, "MimiQ", lists what is generalised):
- x ~ N(0, 1) in normalised space; one AdamW (lr 0.1, betas (0.9, 0.999), eps 1e-8, weight
  decay 1e-6, decoupled) with the lr annealed by a cosine from 0.1 to 0.001 over the run.
- Each step rolls H and W by two independent offsets in [-8, 8] px (the second half of the
  steps [-16, 16], at 224 px), the same for the batch; then adds a per-(image, channel)
  Gaussian offset whose scale falls with the step (GaussianNoise), then a per-(image,
  channel) colour jitter (x - m) / s, m ~ U(-1, 1), s = exp(U(-1, 1)) (ColorJitter).
- Loss = CE(logits, hard label) + SSIM term + 2.5e-5 * TV of the image before the jitter
  (L2 form: the four neighbour-difference norms over the batch, the diagonals / sqrt 2).
- The SSIM term: every block's attention scores before the softmax (ViT: q k^T of the patch
  tokens, unscaled; Swin: (q / sqrt(d)) k^T per window, before the relative position bias
  and the shift mask), each query's row min-max normalised over the keys; for every pair of
  heads (h, g) the global SSIM of their rows; the term is the mean of 1 - SSIM^2 over
  blocks, queries and head pairs (the diagonal included).
- After the step every channel is clipped to its valid pixel range.

Every draw is a function of the seed: the per-step offsets (and flips, off by default)
form a host-side plan; the per-image noise and colour draws come from a key folded with the
step and the global image index, so padding, device count and resume change nothing.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spdfq_jax import checkpoint, interrupt, parallel
from spdfq_jax.models import taps
from spdfq_jax.synth import losses
from spdfq_jax.synth.layout import ModelInfo, pixel_range
from spdfq_jax.synth.plan import jitter_limit, plan_row
from spdfq_jax.synth.readout import fetch_points, finite_or_raise, report_block
from spdfq_jax.synth.step import check_runtime, step_module

# Stream ids of MimiQ's draws (the list is in objective.py): 7 the per-step plan (offsets,
# flips), 8 the per-(step, image) augmentation key (noise and colour jitter).
_MIMIQ_PLAN, _MIMIQ_AUG = 7, 8

SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2
# The script's TV: weight of each neighbour difference's batch norm (W, H, two diagonals).
TV_DIRECTIONS = (1.0, 1.0, 2.0 ** -0.5, 2.0 ** -0.5)
TERMS = ("ssim", "ce", "tv")


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, on a setting MimiQ's loop cannot run."""
  if not isinstance(cfg.iterations, int) or cfg.iterations < 0:
    raise ValueError(f"synth.iterations must be an integer >= 0, got {cfg.iterations!r}")
  if cfg.tv_mode != "min":
    raise ValueError(f"synth.tv_mode {cfg.tv_mode!r}: mimiq minimises its TV (its script has "
                     "no target); set synth.tv_mode='min'.")
  if len(tuple(cfg.jitter)) != 2 or min(cfg.jitter) < 0:
    raise ValueError(f"synth.jitter {tuple(cfg.jitter)}: mimiq takes two roll limits >= 0 "
                     "(first half of the steps, second half), e.g. (8, 16).")
  if not 0 <= cfg.mimiq_lr_min <= cfg.lr:
    raise ValueError(f"synth.mimiq_lr_min {cfg.mimiq_lr_min} must lie in [0, synth.lr].")
  if cfg.mimiq_noise_std < 0 or min(cfg.mimiq_color_jitter) < 0:
    raise ValueError("synth.mimiq_noise_std and synth.mimiq_color_jitter must be >= 0 "
                     f"(got {cfg.mimiq_noise_std}, {tuple(cfg.mimiq_color_jitter)}).")
  if cfg.microbatches != 1:
    raise ValueError("synth.microbatches > 1 is not supported by mimiq (its TV spans the "
                     "batch); set synth.microbatches=1 and use synth.remat to save memory.")
  check_runtime(cfg)


@dataclasses.dataclass(frozen=True)
class MimiqPlan:
  """Every per-step value of a MimiQ run, from the seed (the batch shares them)."""
  lr: np.ndarray  # (T,) float32, cosine from cfg.lr to mimiq_lr_min
  shift_h: np.ndarray  # (T,) int32 roll of H (px)
  shift_w: np.ndarray  # (T,) int32 roll of W (px)
  flip: np.ndarray  # (T,) bool
  noise_scale: np.ndarray  # (T,) float32, GaussianNoise's std at the step

  def table(self) -> dict[str, np.ndarray]:
    t = len(self.lr)
    return {"step": np.arange(t, dtype=np.int32), "lr": self.lr.astype(np.float32),
            "shift_h": self.shift_h.astype(np.int32), "shift_w": self.shift_w.astype(np.int32),
            "flip": self.flip.astype(np.bool_),
            "noise_scale": self.noise_scale.astype(np.float32)}


def lr_schedule(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """torch's CosineAnnealingLR(T_max=iterations, eta_min) stepped once per step: step t
  runs at eta_min + (lr - eta_min) (1 + cos(pi t / T)) / 2."""
  t = np.arange(cfg.iterations, dtype=np.float64)
  lo = cfg.mimiq_lr_min
  return (lo + (cfg.lr - lo) * (1 + np.cos(np.pi * t / max(cfg.iterations, 1))) / 2
          ).astype(np.float32)


def noise_scales(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """GaussianNoise(max_iter=T, std=s)'s scale at step t: s * r / T, where its counter r is
  T - 1 at construction (a draw the loop never uses) and then falls by one per call modulo
  T: T - 2, ..., 0 and, at the last step, T - 1 again."""
  t_max = max(cfg.iterations, 1)
  rem = (t_max - 2 - np.arange(cfg.iterations)) % t_max
  return (rem * cfg.mimiq_noise_std / t_max).astype(np.float32)


def jitter_limits(cfg: ml_collections.ConfigDict, size: int) -> np.ndarray:
  """(T,) roll limit per step: jitter[0] while t < T / 2, then jitter[1]; scaled from
  `jitter_reference` px to `size` as PSAQ-ViT's limits are (8 / 16 px at 224)."""
  t = np.arange(cfg.iterations)
  first, second = jitter_limit(cfg, 0, size), jitter_limit(cfg, 1, size)
  return np.where(t < cfg.iterations / 2, first, second)


def make_plan(cfg: ml_collections.ConfigDict, info: ModelInfo) -> MimiqPlan:
  """The run's `MimiqPlan`: lr, roll offsets (H and W drawn apart), flips, noise scale."""
  check_config(cfg)
  limit = jitter_limits(cfg, info.image_shape[0])
  g = np.random.default_rng([cfg.seed, _MIMIQ_PLAN])
  shift_h = g.integers(-limit, limit + 1).astype(np.int32)
  shift_w = g.integers(-limit, limit + 1).astype(np.int32)
  flip = (g.random(cfg.iterations) < 0.5) & bool(cfg.flip)
  return MimiqPlan(lr_schedule(cfg), shift_h, shift_w, flip, noise_scales(cfg))


def augment_draws(cfg: ml_collections.ConfigDict, row: dict, index: jax.Array, channels: int
                  ) -> dict[str, jax.Array]:
  """The step's augmentation, per image: keyed by (seed, step, global image index), never
  by batch position. noise: N(0, 1) x the step's scale; the colour jitter's m = (u - 1/2)
  2 a and s = exp((u' - 1/2) 2 b), (a, b) = mimiq_color_jitter. Each (B, C)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), _MIMIQ_AUG),
                           row["step"])
  a, b = cfg.mimiq_color_jitter

  def one(i):
    kn, km, ks = jax.random.split(jax.random.fold_in(key, i), 3)
    return (jax.random.normal(kn, (channels,)),
            jax.random.uniform(km, (channels,)), jax.random.uniform(ks, (channels,)))

  n, um, us = jax.vmap(one)(index)
  return {"shift_h": row["shift_h"], "shift_w": row["shift_w"], "flip": row["flip"],
          "noise": n * row["noise_scale"], "mean": (um - 0.5) * 2 * a,
          "std": jnp.exp((us - 0.5) * 2 * b)}


def augment(x: jax.Array, d: dict) -> jax.Array:
  """The script's view of the image: roll H and W, flip W where `flip` (off by default),
  add the per-channel noise, then colour-jitter (x - m) / s. NHWC, draws (B, C)."""
  x = jnp.roll(x, (d["shift_h"], d["shift_w"]), axis=(1, 2))
  x = jnp.where(d["flip"], jnp.flip(x, 2), x)
  x = x + d["noise"][:, None, None, :]
  return (x - d["mean"][:, None, None, :]) / d["std"][:, None, None, :]


def head_ssim_loss(scores: jax.Array, batch: int) -> jax.Array:
  """(batch,) mean over queries and head pairs of 1 - SSIM^2 of one block's (B*, H, Q, K)
  scores (B* = batch x windows for Swin): each query row min-max normalised over the keys,
  then the SSIM of two heads' rows over all keys at once (global means and variances)."""
  a = scores - scores.min(-1, keepdims=True)
  a = a / (a.max(-1, keepdims=True) + 1e-8)
  a = a.transpose(0, 2, 1, 3)  # (B*, Q, H, K)
  k = a.shape[-1]
  mu = a.mean(-1)
  mu_sq = mu ** 2
  mu12 = mu[..., :, None] * mu[..., None, :]
  var = (a * a).mean(-1) - mu_sq
  cov = jnp.einsum("...hk,...gk->...hg", a, a) / k - mu12
  ssim = ((2 * mu12 + SSIM_C1) * (2 * cov + SSIM_C2)) / (
      (mu_sq[..., :, None] + mu_sq[..., None, :] + SSIM_C1)
      * (var[..., :, None] + var[..., None, :] + SSIM_C2))
  per = (1 - ssim ** 2).reshape(batch, -1)
  return per.mean(-1)


def ssim_loss(scores: list[jax.Array], attn_vs: list[jax.Array], info: ModelInfo,
              batch: int) -> jax.Array:
  """(batch,) the SSIM term: mean over blocks of `head_ssim_loss`. ViT/DeiT compare the
  patch tokens' rows over the patch keys (prefix tokens dropped as queries and keys) on the
  unscaled q k^T the script's hook sees; Swin every window's rows over its keys on the
  scaled scores before the bias, as its hook sees them."""
  per = []
  for s, v in zip(scores, attn_vs):
    if not info.swin:
      p = info.prefix
      head_dim = v.shape[-1] // s.shape[1]
      s = s[:, :, p:, p:] * jnp.sqrt(jnp.float32(head_dim))
    per.append(head_ssim_loss(s, batch))
  return sum(per) / len(per)


def tv_loss(x: jax.Array, mask: jax.Array) -> jax.Array:
  """The script's TV on NHWC images: the L2 norm over the (valid) batch of each neighbour
  difference, the diagonal ones divided by sqrt 2, summed."""
  sq = (losses.tv_sq_norms(x) * mask[:, None]).sum(0)
  return sum(w * jnp.sqrt(sq[i] + 1e-12) for i, w in enumerate(TV_DIRECTIONS))


def objective(module, params: Any, x: jax.Array, fixed: dict, draws: dict,
              cfg: ml_collections.ConfigDict, info: ModelInfo
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total, weighted terms) of one step: SSIM and CE on the augmented image (means over
  the valid images), TV on the image itself."""
  mask = fixed["mask"]
  n_valid = jnp.maximum(mask.sum(), 1.0)
  mean = lambda v: (v * mask).sum() / n_valid
  logits, scores, attn_vs = taps.apply_with_scores(module, {"params": params},
                                                   augment(x, draws))
  terms = {"ssim": cfg.mimiq_ssim_weight * mean(ssim_loss(scores, attn_vs, info, x.shape[0])),
           "ce": cfg.mimiq_ce_weight * mean(losses.soft_cross_entropy(logits, fixed["targets"])),
           "tv": cfg.tv_weight * tv_loss(x, mask)}
  return sum(terms.values()), terms


def apply_update(adam: optax.GradientTransformation, x: jax.Array, grad: jax.Array,
                 opt_state: Any, lr: jax.Array, cfg: ml_collections.ConfigDict,
                 lo: np.ndarray, hi: np.ndarray) -> tuple[jax.Array, Any]:
  """torch's AdamW step (decay x by lr * wd first, then the bias-corrected Adam step at
  lr), then every channel clipped to its pixel range."""
  updates, opt_state = adam.update(grad, opt_state)
  x = x * (1 - lr * cfg.mimiq_weight_decay) - lr * updates
  return jnp.clip(x, lo, hi), opt_state


def make_step(module, cfg: ml_collections.ConfigDict, info: ModelInfo, mesh) -> Callable:
  """The jitted step (params, x, adam, fixed, table, t, log) -> (x, adam, t + 1, log): step
  t's draws made on the device, one AdamW update, terms written to row t % K of `log`."""
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
  lo, hi = pixel_range(cfg, info.image_shape[-1])
  net = step_module(module, cfg)
  channels = info.image_shape[-1]

  def step(params, x, opt_state, fixed, table, t, log):
    row = plan_row(table, t)
    draws = augment_draws(cfg, row, fixed["index"], channels)
    grad, terms = jax.grad(lambda x: objective(net, params, x, fixed, draws, cfg, info),
                           has_aux=True)(x)
    x, opt_state = apply_update(adam, x, grad, opt_state, row["lr"], cfg, lo, hi)
    k = log["ce"].shape[0]
    log = {n: log[n].at[t % k].set(terms[n]) for n in TERMS}
    return x, opt_state, t + 1, log

  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  opt_sh = optax.ScaleByAdamState(count=rep, mu=batch, nu=batch)
  return jax.jit(step, in_shardings=(rep, batch, opt_sh, batch, rep, rep, rep),
                 out_shardings=(batch, opt_sh, rep, rep), donate_argnums=(1, 2, 5, 6))


def invert(module, params: Any, cfg: ml_collections.ConfigDict, info: ModelInfo,
           x0: np.ndarray, targets: np.ndarray, plan: MimiqPlan, *,
           directory: Optional[str] = None, progress: bool = True,
           callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> np.ndarray:
  """Runs MimiQ's loop from `x0` (normalised NHWC) against one-hot `targets`; returns the
  last iterate. With a `directory`, checkpoints every `cfg.checkpoint_every` steps and
  resumes from the newest; on SIGTERM it saves after the current step and raises
  `interrupt.Stopped`."""
  n = x0.shape[0]
  mesh = parallel.data_mesh()
  pad = lambda a: parallel.pad_batch(np.asarray(a), mesh.devices.size)[0]
  rep = parallel.replicated(mesh)
  fixed = parallel.shard_batch(
      {"index": pad(np.arange(n, dtype=np.int32)),
       "mask": (np.arange(pad(x0).shape[0]) < n).astype(np.float32),
       "targets": pad(targets)}, mesh)
  params = jax.device_put(params, rep)
  table = jax.device_put(plan.table(), rep)
  step_fn = make_step(module, cfg, info, mesh)
  log = jax.device_put({k: np.zeros(cfg.log_every, np.float32) for k in TERMS}, rep)
  total = len(plan.lr)

  def to_device(x, mu, nu, count):
    st = optax.ScaleByAdamState(count=jax.device_put(np.int32(count), rep),
                                mu=parallel.shard_batch(pad(mu), mesh),
                                nu=parallel.shard_batch(pad(nu), mesh))
    return parallel.shard_batch(pad(x), mesh), st

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
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=start, desc="synth[mimiq]", leave=False)
  try:
    saves = cfg.checkpoint_every if mgr is not None else total
    for first, end in fetch_points(start, total, cfg.log_every, saves):
      stop = False
      for s in range(first, end):
        x, opt_state, t, log = step_fn(params, x, opt_state, fixed, table, t, log)
        if interrupt.requested() and s + 1 < total:
          end, stop = s + 1, True
          break
      rows = slice(first % cfg.log_every, first % cfg.log_every + end - first)
      values = {k: v[rows] for k, v in jax.device_get(log).items()}
      finite_or_raise(first, values)
      report_block(first, end, values, bar, callback)
      stop = stop or (interrupt.requested() and end < total)
      if mgr is not None and (end % cfg.checkpoint_every == 0 or stop) and end < total:
        checkpoint.save(mgr, end, {"images": x[:n], "mu": opt_state.mu[:n],
                                   "nu": opt_state.nu[:n], "count": opt_state.count,
                                   "step": np.asarray(end, np.int32)})
      if stop:
        raise interrupt.Stopped("synthesis (mimiq)", end)
  finally:
    if bar is not None:
      bar.close()
  return parallel.to_host(x)[:n].astype(np.float32)
