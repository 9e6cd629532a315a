"""SMI: sparse model inversion (Hu et al., ICML 2024), equal to its reference code
(github Egg-Hu/SMI at a5fec4d: `synthesis/smi.py`, `utils/build_model.py`, `test_quant.py`).

The loop, as the reference runs it (docs/synthesis.md, "SMI", lists its quirks):
- x ~ N(0, 1) in normalised space; ONE Adam (lr 0.25 constant, betas (0.5, 0.99)) for
  4000 steps; loss = CE(logits, hard label) + 1e-4 * TV_L2(x), the TV on the image before
  the jitter; after each step every channel is clipped to its valid range.
- Each ordinary step rolls H and W by two independent offsets in [-S/8, S/8] px and flips
  W with p 0.5; once tokens are pruned, each kept token's index moves with the roll
  (rounded to the nearest whole patch, halves up) and the flip.
- Pruning at steps p (50, 100, 200, 300): step p - 1 runs without jitter and ranks the
  patch tokens it kept by the last block's class-token attention (mean over heads); from
  step p on only the top int(k * (1 - ratio)) of the k kept patches (and the prefix
  tokens) go past the position embedding, so later steps cost less. Step p runs without
  jitter too.
- The reference keeps `best_inputs = inputs.data`, which aliases the optimised tensor:
  the result is the last iterate, not the lowest-loss one.
- The final mask: the last iterate is de-normalised to [0, 1] pixels and that pixel image
  (not re-normalised) is ranked once more at full tokens; the top
  int((P + 1) * prod(1 - ratio)) patches keep their pixels, the rest are zero. The images
  go through an 8-bit PNG (truncated, not rounded) and are read back with a
  normalisation that keeps zero pixels at zero, so pruned patches (and any pixel darker
  than 1/255) are 0 in normalised space; calibration then sees only the non-zero patches.

Token counts are static per phase, so each phase's step compiles once; the kept indices
are per image (top-k of its own attention), so padding and device count change nothing.
ViT and DeiT only: the ranking needs a class token (a distilled DeiT keeps both prefix
tokens and ranks by the class token's row, which the reference, built for timm's
non-distilled forward, cannot run).
"""
from __future__ import annotations

import dataclasses
import functools
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
from spdfq_jax.synth.config import SMI_SWIN_REFUSAL
from spdfq_jax.synth.layout import ModelInfo, pixel_range
from spdfq_jax.synth.readout import fetch_points, finite_or_raise, report_block
from spdfq_jax.synth.step import step_module

# Stream id of SMI's per-step draws (roll offsets, flips); the list is in objective.py.
_SMI_PLAN = 6

JIT, PRE, PRUNE = "jitter", "rank", "prune"  # the kinds of step


@dataclasses.dataclass(frozen=True)
class SmiPlan:
  """Every per-step value of an SMI run, drawn on the host from the seed.

  kinds[t]: JIT (jittered forward), PRE (step p - 1: no jitter; ranks the kept patches and
  keeps the top `keep_after[t]` for the next step) or PRUNE (step p: no jitter).
  tokens[t]: patch tokens the step's forward keeps. final_keep: patches left unmasked.
  """
  kinds: tuple[str, ...]
  tokens: tuple[int, ...]
  keep_after: tuple[int, ...]  # patch tokens kept after step t (= tokens[t + 1])
  shift_h: np.ndarray  # (T,) int32 roll of H (px)
  shift_w: np.ndarray  # (T,) int32 roll of W (px)
  flip: np.ndarray  # (T,) bool
  final_keep: int


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, on a prune schedule the reference cannot run."""
  at, ratio = tuple(cfg.smi_prune_at), tuple(cfg.smi_prune_ratio)
  if len(at) != len(ratio):
    raise ValueError(f"synth.smi_prune_at {at} and synth.smi_prune_ratio {ratio} must have "
                     "the same length (one ratio per pruning step).")
  if any(not 0 <= r < 1 for r in ratio):
    raise ValueError(f"synth.smi_prune_ratio {ratio}: each ratio must lie in [0, 1).")
  if any(int(p) != p or p < 1 for p in at) or any(b - a < 2 for a, b in zip(at, at[1:])):
    raise ValueError(f"synth.smi_prune_at {at}: pruning steps must be integers >= 1, "
                     "increasing, at least 2 apart (step p - 1 ranks the patches that step "
                     "p drops); () inverts densely.")
  if not 0 <= cfg.smi_jitter < 0.5:
    raise ValueError(f"synth.smi_jitter {cfg.smi_jitter}: the roll limit is a fraction of "
                     "the image side in [0, 0.5) (the reference's 1/8).")
  if cfg.microbatches != 1:
    raise ValueError("synth.microbatches > 1 is not supported by smi (its token plan is per "
                     "batch); set synth.microbatches=1 and use synth.remat to save memory.")


def final_keep(patches: int, ratios) -> int:
  """The reference's final top-K: int((patches + 1) * prod(1 - r)), the class token counted
  in (its `num_patches` = 197 at 14 x 14), over every ratio, reached or not; at most
  `patches`."""
  kept = 1.0
  for r in ratios:
    kept = kept * (1.0 - r)
  return min(int((patches + 1) * kept), patches)


def make_plan(cfg: ml_collections.ConfigDict, info: ModelInfo) -> SmiPlan:
  """The run's `SmiPlan`: step kinds, token counts, roll offsets and flips."""
  check_config(cfg)
  if info.swin:
    raise ValueError(SMI_SWIN_REFUSAL)
  total = cfg.iterations
  at = [int(p) for p in cfg.smi_prune_at]
  ratio_of = dict(zip(at, cfg.smi_prune_ratio))
  patches = info.grid[0] ** 2
  kinds, tokens, after = [], [], []
  k = patches
  for t in range(total):
    kinds.append(PRE if t + 1 in ratio_of else PRUNE if t in ratio_of else JIT)
    tokens.append(k)
    if t + 1 in ratio_of:
      k = int(k * (1.0 - ratio_of[t + 1]))
    after.append(k)
  keep = final_keep(patches, cfg.smi_prune_ratio)
  if min(after, default=patches) < 1 or keep < 1:
    raise ValueError(f"synth.smi_prune_ratio {tuple(cfg.smi_prune_ratio)} prunes every patch "
                     f"of the {info.grid[0]} x {info.grid[0]} grid; lower the ratios.")
  size = info.image_shape[0]
  lim = int(size * cfg.smi_jitter)
  g = np.random.default_rng([cfg.seed, _SMI_PLAN])
  shift_h = g.integers(-lim, lim + 1, total).astype(np.int32)
  shift_w = g.integers(-lim, lim + 1, total).astype(np.int32)
  flip = (g.random(total) < 0.5) & bool(cfg.flip)
  return SmiPlan(tuple(kinds), tuple(tokens), tuple(after), shift_h, shift_w, flip, keep)


def cell_shift(offset: jax.Array, patch: int) -> jax.Array:
  """A pixel roll in whole patches as the reference counts it: floor division, plus one
  when the remainder (always >= 0) is at least half a patch."""
  return offset // patch + (2 * (offset % patch) >= patch).astype(offset.dtype)


def jitter_keep(keep: jax.Array, shift_h: jax.Array, shift_w: jax.Array, flip: jax.Array,
                grid: int, patch: int, prefix: int) -> jax.Array:
  """Token indices (B, K) of the kept patches in the rolled and flipped image: the patch
  that sat at (r, c) is taken at ((r + dh) % g, (c + dw) % g), mirrored in c when flipped
  (the reference's `jitter_and_flip_index`); prefix tokens stay."""
  p = keep - prefix
  r = (p // grid + cell_shift(shift_h, patch)) % grid
  c = (p % grid + cell_shift(shift_w, patch)) % grid
  c = jnp.where(flip, grid - 1 - c, c)
  return jnp.where(keep < prefix, keep, r * grid + c + prefix)


def roll_flip(x: jax.Array, shift_h: jax.Array, shift_w: jax.Array, flip: jax.Array
              ) -> jax.Array:
  """The reference's `jitter_and_flip` on NHWC: roll H by shift_h and W by shift_w, then
  flip W where `flip`."""
  x = jnp.roll(x, (shift_h, shift_w), axis=(1, 2))
  return jnp.where(flip, jnp.flip(x, 2), x)


def rank_scores(attn: jax.Array, prefix: int) -> jax.Array:
  """(B, H, N, N) attention of the last block -> (B, N - prefix): the class token's row,
  averaged over heads, over the patch tokens."""
  return attn.mean(1)[:, 0, prefix:]


def sparse_forward(module, params: Any, x: jax.Array, keep: Optional[jax.Array], prefix: int
                   ) -> tuple[jax.Array, jax.Array]:
  """(logits, rank scores) of the model on `x` with only the `keep` tokens (None: all)."""
  logits, attns, _ = taps.apply_with_attention(module, {"params": params}, x, keep=keep)
  return logits, rank_scores(attns[-1], prefix)


def make_step(module, cfg: ml_collections.ConfigDict, info: ModelInfo, mesh,
              donate: bool = True) -> Callable:
  """step(params, x, adam, keep, fixed, row, *, kind, remap, k_next) -> (x, adam, keep,
  terms): one Adam update of the pixels; a PRE step also returns the top `k_next`
  patches' indices (B, prefix + k_next), else `keep` unchanged. With `donate` the step
  consumes its image and Adam arguments."""
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
  lo, hi = pixel_range(cfg, info.image_shape[-1])
  net = step_module(module, cfg)
  grid, prefix = info.grid[0], info.prefix
  patch = info.image_shape[0] // grid

  def objective(x, params, keep, fixed, row, kind, remap):
    mask = fixed["mask"]
    n_valid = jnp.maximum(mask.sum(), 1.0)
    xa, k = x, keep
    if kind == JIT:
      xa = roll_flip(x, row["shift_h"], row["shift_w"], row["flip"])
      if remap:
        k = jitter_keep(keep, row["shift_h"], row["shift_w"], row["flip"], grid, patch, prefix)
    logits, scores = sparse_forward(net, params, xa, k, prefix)
    ce = (losses.soft_cross_entropy(logits, fixed["targets"]) * mask).sum() / n_valid
    terms = {"ce": ce, "tv": cfg.tv_weight * losses.tv_batch(x, mask)}
    return sum(terms.values()), (terms, scores)

  def step(params, x, opt_state, keep, fixed, row, *, kind, remap, k_next):
    grad, (terms, scores) = jax.grad(objective, has_aux=True)(
        x, params, keep, fixed, row, kind, remap)
    updates, opt_state = adam.update(grad, opt_state)
    x = jnp.clip(x - cfg.lr * updates, lo, hi)
    if kind == PRE:
      _, top = jax.lax.top_k(jax.lax.stop_gradient(scores), k_next)
      rel = jnp.concatenate([jnp.broadcast_to(jnp.arange(prefix), (x.shape[0], prefix)),
                             top + prefix], axis=1)
      keep = jnp.take_along_axis(keep, rel, axis=1)
    return x, opt_state, keep, terms

  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  opt_sh = optax.ScaleByAdamState(count=rep, mu=batch, nu=batch)

  @functools.lru_cache(maxsize=None)
  def compiled(kind: str, remap: bool, k_next: Optional[int]) -> Callable:
    return jax.jit(functools.partial(step, kind=kind, remap=remap, k_next=k_next),
                   in_shardings=(rep, batch, opt_sh, batch, batch, rep),
                   out_shardings=(batch, opt_sh, batch, rep),
                   donate_argnums=(1, 2) if donate else ())

  return lambda *args, kind, remap, k_next: compiled(kind, remap, k_next)(*args)


def full_keep(n: int, info: ModelInfo) -> np.ndarray:
  """(n, prefix + P): every token, in order."""
  return np.tile(np.arange(info.prefix + info.grid[0] ** 2, dtype=np.int32), (n, 1))


def invert(module, params: Any, cfg: ml_collections.ConfigDict, info: ModelInfo,
           x0: np.ndarray, targets: np.ndarray, plan: SmiPlan, *,
           directory: Optional[str] = None, progress: bool = True,
           callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> np.ndarray:
  """Runs SMI's loop from `x0` (normalised NHWC) against one-hot `targets`; returns the last
  iterate. With a `directory`, checkpoints every `cfg.checkpoint_every` steps (images, Adam
  state and the kept token indices) and resumes from the newest; on SIGTERM it saves after
  the current step and raises `interrupt.Stopped`."""
  n = x0.shape[0]
  mesh = parallel.data_mesh()
  pad = lambda a: parallel.pad_batch(np.asarray(a), mesh.devices.size)[0]
  rep = parallel.replicated(mesh)
  fixed = parallel.shard_batch({"mask": (np.arange(pad(x0).shape[0]) < n).astype(np.float32),
                                "targets": pad(targets)}, mesh)
  params = jax.device_put(params, rep)
  step_fn = make_step(module, cfg, info, mesh)
  total = len(plan.kinds)
  width = info.prefix + info.grid[0] ** 2

  def to_device(x, mu, nu, count, keep):
    st = optax.ScaleByAdamState(count=jax.device_put(np.int32(count), rep),
                                mu=parallel.shard_batch(pad(mu), mesh),
                                nu=parallel.shard_batch(pad(nu), mesh))
    return parallel.shard_batch(pad(x), mesh), st, parallel.shard_batch(pad(keep), mesh)

  mgr, start = None, 0
  keep0 = full_keep(n, info)
  x, opt_state, keep = to_device(x0, np.zeros_like(x0), np.zeros_like(x0), 0, keep0)
  if directory is not None:
    mgr = checkpoint.manager(os.path.join(directory, "checkpoints"))
    like = {"images": x0, "mu": x0, "nu": x0, "count": np.zeros((), np.int32),
            "step": np.zeros((), np.int32), "keep": keep0}
    restored = checkpoint.restore_latest(mgr, like)
    if restored is not None:
      _, s = restored
      start = int(s["step"])
      tokens = info.prefix + (plan.tokens[start] if start < total else plan.keep_after[-1])
      x, opt_state, keep = to_device(s["images"], s["mu"], s["nu"], int(s["count"]),
                                     np.asarray(s["keep"])[:, :tokens])

  rows = {"shift_h": plan.shift_h, "shift_w": plan.shift_w, "flip": plan.flip}
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=start, desc="synth[smi]", leave=False)
  try:
    saves = cfg.checkpoint_every if mgr is not None else total
    for first, end in fetch_points(start, total, cfg.log_every, saves):
      pending, stop = [], False
      for s in range(first, end):
        kind = plan.kinds[s]
        row = jax.device_put({k: v[s] for k, v in rows.items()}, rep)
        x, opt_state, keep, terms = step_fn(
            params, x, opt_state, keep, fixed, row, kind=kind,
            remap=plan.tokens[s] < info.grid[0] ** 2,
            k_next=plan.keep_after[s] if kind == PRE else None)
        pending.append(terms)
        if interrupt.requested() and s + 1 < total:
          end, stop = s + 1, True
          break
      got = jax.device_get(pending)
      values = {k: np.asarray([g[k] for g in got]) for k in got[0]}
      finite_or_raise(first, values)
      report_block(first, end, values, bar, callback)
      stop = stop or (interrupt.requested() and end < total)
      if mgr is not None and (end % cfg.checkpoint_every == 0 or stop) and end < total:
        kept = np.full((n, width), -1, np.int32)
        kept[:, :keep.shape[1]] = parallel.to_host(keep)[:n]
        checkpoint.save(mgr, end, {"images": x[:n], "mu": opt_state.mu[:n],
                                   "nu": opt_state.nu[:n], "count": opt_state.count,
                                   "step": np.asarray(end, np.int32), "keep": kept})
      if stop:
        raise interrupt.Stopped("synthesis (smi)", end)
  finally:
    if bar is not None:
      bar.close()
  return parallel.to_host(x)[:n].astype(np.float32)


def denormalize(x: np.ndarray, mean, std) -> np.ndarray:
  """The reference's `Normalizer(reverse=True)` with keep_zero: (x - (-m/s)) / (1/s), and
  an entry that is exactly 0 stays 0."""
  m = np.asarray(mean, np.float32)
  s = np.asarray(std, np.float32)
  out = (x - (-m / s)) / (np.float32(1) / s)
  return np.where(x == 0, np.float32(0), out).astype(np.float32)


def png_round_trip(pixels: np.ndarray, mean, std) -> np.ndarray:
  """What the reference's data pool hands to calibration: the [0, 1] image saved as 8-bit
  PNG (`(clamp(0, 1) * 255).astype(uint8)`, truncated), read back, /255 and normalised with
  keep_zero (a 0 pixel stays 0 instead of -mean/std)."""
  u8 = (np.clip(pixels, 0, 1) * np.float32(255)).astype(np.uint8)
  p = u8.astype(np.float32) / np.float32(255)
  m = np.asarray(mean, np.float32)
  s = np.asarray(std, np.float32)
  return np.where(u8 == 0, np.float32(0), (p - m) / s).astype(np.float32)


def final_mask(module, params: Any, cfg: ml_collections.ConfigDict, info: ModelInfo,
               x: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
  """(calibration images, kept patch indices (n, keep) ascending, 0-based) from the last
  iterate, as the reference's end of `synthesize` and its data pool make them."""
  pixels = denormalize(x, cfg.mean, cfg.std)
  rank = jax.jit(lambda p, v: sparse_forward(module, p, v, None, info.prefix)[1])
  _, top = jax.lax.top_k(rank(params, jnp.asarray(pixels)), keep)
  kept = np.sort(np.asarray(top), axis=1).astype(np.int32)
  g = info.grid[0]
  patch = info.image_shape[0] // g
  cells = np.zeros((x.shape[0], g * g), np.float32)
  np.put_along_axis(cells, kept, 1.0, axis=1)
  mask = np.repeat(np.repeat(cells.reshape(-1, g, g), patch, 1), patch, 2)[..., None]
  return png_round_trip(pixels * mask, cfg.mean, cfg.std), kept


def nonzero_patches(images: np.ndarray, patch: int) -> np.ndarray:
  """(n, P) bool: which patches hold a non-zero value (the reference's
  `find_non_zero_patches`, which calibration uses to drop the pruned ones)."""
  n, h, w, c = images.shape
  cells = images.reshape(n, h // patch, patch, w // patch, patch, c)
  return (cells != 0).any(axis=(2, 4, 5)).reshape(n, -1)
