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
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spdfq_jax import checkpoint, parallel
from spdfq_jax.models import taps
from spdfq_jax.models.swin import SwinTransformer
from spdfq_jax.synth import losses, priors as priors_lib, regions

SUBDIR = "synthetic"
RESULT = "result.npz"
CONFIG = "config.json"

# Stream ids, one per kind of randomness (priors use 3, see priors.py; steps fold 4 into
# the JAX key of the jitted step).
_INIT, _LABELS, _STEPS = 1, 2, 4


@dataclasses.dataclass
class SynthResult:
  """Synthetic calibration set. Images are NHWC, normalised and clamped to the pixel range."""
  images: np.ndarray  # (n, H, W, C) float32
  classes: np.ndarray  # (n,) int32 target class of each whole image
  targets: np.ndarray  # (n, num_classes) soft (SL) or one-hot targets
  region_classes: Optional[np.ndarray] = None  # (n, R) MSR classes
  region_targets: Optional[np.ndarray] = None  # (n, R, num_classes)
  priors: Optional[list[np.ndarray]] = None  # APA priors, one (n, heads, G) per APA block
  apa_blocks: tuple[int, ...] = ()  # 0-based block index of each prior


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
  swin = isinstance(module, SwinTransformer)
  size = cfg.image_size or module.img_size
  embed = params["patch_embed"]["proj"] if swin else params["patch_embed"]
  channels = cfg.channels or int(embed["kernel"].shape[2])
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
  """0-based blocks that APA aligns: the deeper half (1-based l >= L/2) or all."""
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
  """N(0, 1) in normalised space, clamped: the noise baseline and every loop's start."""
  lo, hi = pixel_range(cfg, info.image_shape[-1])
  x = np.stack([_rng(cfg, _INIT, i).standard_normal(info.image_shape, np.float32)
                for i in range(cfg.num_images)])
  return np.clip(x, lo, hi).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def draw_labels(cfg: ml_collections.ConfigDict, info: ModelInfo) -> dict[str, np.ndarray]:
  """Classes and targets of whole images and MSR regions, fixed for the run.

  Without SL the targets are one-hot; with SL softmax(Z), Z = U(soft_label_range) at the
  class and 0 elsewhere. Region classes are fixed per (image, region) (open: not redrawn
  each step).
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
  cls, z, rcls, rz = (np.asarray(v) for v in (cls, z, rcls, rz))
  eye = np.eye(c, dtype=np.float64)
  if cfg.sl:
    logits = eye[cls] * z[:, None]
    if cfg.whole_target_has_regions and cfg.msr:
      logits = logits + (eye[rcls] * rz[..., None]).sum(1)
    targets, rtargets = _softmax(logits), _softmax(eye[rcls] * rz[..., None])
  else:
    targets, rtargets = eye[cls], eye[rcls]
  return {"classes": cls.astype(np.int32), "targets": targets.astype(np.float32),
          "region_classes": rcls.astype(np.int32), "region_targets": rtargets.astype(np.float32)}


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


def augment(x: jax.Array, key: jax.Array, limit: jax.Array, flip: bool) -> jax.Array:
  """Random roll by up to +-limit px along H and W, then a random horizontal flip.

  One draw for the whole batch per step, as in PSAQ-ViT: a batch-wide roll is a cheap
  dynamic slice (a per-image roll becomes a gather/scatter pair), and the draw depends on
  (seed, step) only, never on the batch layout.
  """
  kr, kf = jax.random.split(key)
  dy, dx = jax.random.randint(kr, (2,), -limit, limit + 1)
  h, w = x.ndim - 3, x.ndim - 2
  x = jnp.roll(x, (dy, dx), axis=(h, w))
  if flip:
    x = jnp.where(jax.random.bernoulli(kf), jnp.flip(x, w), x)
  return x


def loss_terms(module, params: Any, x: jax.Array, fixed: dict, key: jax.Array,
               jitter: jax.Array, tv_target: jax.Array, cfg: ml_collections.ConfigDict,
               info: ModelInfo, blocks: tuple[int, ...]) -> dict[str, jax.Array]:
  """Weighted loss terms (batch means over valid images); their sum is the objective."""
  b = x.shape[0]
  mask = fixed["mask"]
  n_valid = jnp.maximum(mask.sum(), 1.0)
  mean = lambda v: (v * mask).sum() / n_valid
  k_aug, k_raug, k_sel = jax.random.split(key, 3)
  xa = augment(x, k_aug, jitter, cfg.flip)
  terms = {}
  if cfg.apa or cfg.entropy:
    logits, attns, attn_vs = taps.apply_with_attention(module, {"params": params}, xa)
  else:
    logits = module.apply({"params": params}, xa)
  terms["ce"] = mean(losses.soft_cross_entropy(logits, fixed["targets"]))
  if cfg.apa:
    weights = losses.depth_weights(blocks, info.depth, cfg.depth_weight)
    per = losses.apa_loss(attns, fixed["priors"], blocks, weights, info.prefix, info.swin)
    terms["apa"] = cfg.alpha1 * mean(per)
  if cfg.entropy:
    per = losses.patch_entropy_loss(attn_vs, info.heads, info.prefix, b, cfg.entropy_bandwidth,
                                    cfg.entropy_points)
    terms["entropy"] = cfg.entropy_weight * mean(per)
  if cfg.msr:
    reg = regions.all_regions(x, cfg.msr_grid)  # (B, R, H, W, C)
    r = reg.shape[1]
    # Region choice per image, keyed by the image index: independent of the batch layout.
    sel = jax.vmap(lambda i: regions.select_regions(jax.random.fold_in(k_sel, i), r, cfg.k_msr)
                   )(fixed["index"])  # (B, R)
    reg = augment(reg, k_raug, jitter, cfg.flip)
    rlogits = module.apply({"params": params}, reg.reshape((b * r,) + reg.shape[2:]))
    ce = losses.soft_cross_entropy(rlogits, fixed["region_targets"].reshape(b * r, -1))
    terms["msr"] = mean((ce.reshape(b, r) * sel).sum(-1))
  if cfg.tv_weight:
    tv = losses.tv_batch(x, mask)
    terms["tv"] = cfg.tv_weight * (jnp.abs(tv - tv_target) if cfg.tv_mode == "target" else tv)
  return terms


def round_schedule(cfg: ml_collections.ConfigDict) -> Callable[[int], float]:
  """Learning rate at a step inside one round: linear warm-up, cosine decay to zero."""
  per_round = cfg.iterations // cfg.rounds
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup, per_round - 1),
                                            per_round, 0.0)


def jitter_limit(cfg: ml_collections.ConfigDict, round_index: int, size: int) -> int:
  j = cfg.jitter[min(round_index, len(cfg.jitter) - 1)]
  return int(round(j * size / cfg.jitter_reference)) if cfg.jitter_reference else int(j)


def make_step(module, cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...],
              mesh) -> Callable:
  """The jitted step (params, x, adam, fixed, step, lr, jitter, tv_target) -> (x, adam, terms)."""
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
  lo, hi = pixel_range(cfg, info.image_shape[-1])
  root = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), _STEPS)

  def step(params, x, opt_state, fixed, step_index, lr, jitter, tv_target):
    key = jax.random.fold_in(root, step_index)

    def objective(x):
      terms = loss_terms(module, params, x, fixed, key, jitter, tv_target, cfg, info, blocks)
      return sum(terms.values()), terms

    grad, terms = jax.grad(objective, has_aux=True)(x)
    updates, opt_state = adam.update(grad, opt_state)
    x = jnp.clip(x - lr * updates, lo, hi)
    return x, opt_state, terms

  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  opt_sh = optax.ScaleByAdamState(count=rep, mu=batch, nu=batch)
  return jax.jit(step, in_shardings=(rep, batch, opt_sh, batch, rep, rep, rep, rep),
                 out_shardings=(batch, opt_sh, rep), donate_argnums=(1, 2))


def _config_json(cfg: ml_collections.ConfigDict) -> str:
  return cfg.to_json(sort_keys=True)


def save_result(directory: str, result: SynthResult, cfg: ml_collections.ConfigDict) -> None:
  """npz (images, labels, priors) + config json, written atomically (tmp + rename)."""
  arrays = {"images": result.images, "classes": result.classes, "targets": result.targets,
            "apa_blocks": np.asarray(result.apa_blocks, np.int32)}
  if result.region_classes is not None:
    arrays["region_classes"] = result.region_classes
    arrays["region_targets"] = result.region_targets
  for j, p in enumerate(result.priors or []):
    arrays[f"prior_{j}"] = p
  tmp = os.path.join(directory, "result.tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, os.path.join(directory, RESULT))


def load_result(path: str) -> SynthResult:
  """Reads a `result.npz` written by `generate`."""
  z = np.load(path)
  pri = [z[f"prior_{j}"] for j in range(len([k for k in z.files if k.startswith("prior_")]))]
  return SynthResult(z["images"], z["classes"], z["targets"],
                     z["region_classes"] if "region_classes" in z.files else None,
                     z["region_targets"] if "region_targets" in z.files else None,
                     pri or None, tuple(int(v) for v in z["apa_blocks"]))


def _check_config(directory: str, cfg: ml_collections.ConfigDict) -> None:
  path = os.path.join(directory, CONFIG)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != json.loads(_config_json(cfg)):
      raise ValueError(f"{directory} holds a synthesis run with another config; "
                       "use a fresh workdir or delete that directory.")
  else:
    with open(path, "w") as f:
      f.write(_config_json(cfg))


def _finite_or_raise(step: int, terms: dict[str, float]) -> None:
  bad = [k for k, v in terms.items() if not math.isfinite(v)]
  if bad:
    detail = ", ".join(f"{k}={terms[k]}" for k in bad)
    raise FloatingPointError(f"synthesis loss is not finite at step {step}: {detail} "
                             f"(all terms: {terms})")


def generate(module, params: Any, cfg: ml_collections.ConfigDict, *,
             workdir: Optional[str] = None, progress: bool = True,
             real_images: Optional[np.ndarray] = None,
             callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> SynthResult:
  """Synthesises `cfg.num_images` calibration images against the FP model.

  With a workdir the run saves Orbax checkpoints every `cfg.checkpoint_every` steps into
  `workdir/synthetic/`, resumes from the newest one, and writes result.npz, config.json,
  grid.png and attention.png there; a finished run is loaded instead of recomputed.
  `real_images` feed `cfg.prior='real'`; `callback(step, terms)` runs after every step.
  """
  directory = None
  if workdir is not None:
    directory = os.path.join(workdir, SUBDIR)
    os.makedirs(directory, exist_ok=True)
    _check_config(directory, cfg)
    if os.path.exists(os.path.join(directory, RESULT)):
      return load_result(os.path.join(directory, RESULT))

  info = model_info(module, params, cfg)
  blocks = apa_block_indices(info, cfg) if cfg.apa else ()
  labels = draw_labels(cfg, info)
  pri = draw_priors(module, params, cfg, info, blocks, real_images) if cfg.apa else None
  x0 = initial_images(cfg, info)
  result = SynthResult(x0, labels["classes"], labels["targets"],
                       labels["region_classes"] if cfg.msr else None,
                       labels["region_targets"] if cfg.msr else None, pri, blocks)
  if cfg.method != "noise":
    result.images = _optimise(module, params, cfg, info, blocks, labels, pri, x0, directory,
                              progress, callback)
  if directory is not None:
    save_result(directory, result, cfg)
    from spdfq_jax.synth import plots  # PIL only when writing files
    plots.save_figures(directory, module, params, result, cfg, info)
  return result


def _optimise(module, params, cfg, info, blocks, labels, pri, x0, directory, progress,
              callback) -> np.ndarray:
  n = cfg.num_images
  if cfg.iterations % cfg.rounds:
    raise ValueError(f"iterations ({cfg.iterations}) must split evenly into {cfg.rounds} rounds")
  mesh = parallel.data_mesh()
  ndev = mesh.devices.size
  pad = lambda a: parallel.pad_batch(np.asarray(a), ndev)[0]
  fixed = {"index": pad(np.arange(n, dtype=np.int32)),
           "mask": (np.arange(pad(x0).shape[0]) < n).astype(np.float32),
           "targets": pad(labels["targets"]), "region_targets": pad(labels["region_targets"]),
           "priors": [pad(p) for p in (pri or [])]}
  fixed = parallel.shard_batch(fixed, mesh)
  params = jax.device_put(params, parallel.replicated(mesh))
  step_fn = make_step(module, cfg, info, blocks, mesh)
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
  schedule = round_schedule(cfg)
  per_round = cfg.iterations // cfg.rounds
  tv_lo, tv_hi = cfg.tv_target
  tv_scale = losses.tv_target_scale(n, info.image_shape)
  tv_rng = np.random.default_rng  # per-step target: a function of (seed, step) only

  def to_device(x, mu, nu, count):
    x = parallel.shard_batch(pad(x), mesh)
    st = optax.ScaleByAdamState(count=jax.device_put(np.int32(count), parallel.replicated(mesh)),
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

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.iterations, initial=start, desc=f"synth[{cfg.method}]", leave=False)
  try:
    for s in range(start, cfg.iterations):
      r, local = divmod(s, per_round)
      if local == 0:  # a new round restarts Adam (fresh optimiser per round)
        x, opt_state = to_device(np.asarray(x)[:n], np.zeros_like(x0), np.zeros_like(x0), 0)
      tv_target = tv_scale * tv_rng([cfg.seed, s]).uniform(tv_lo, tv_hi)
      x, opt_state, terms = step_fn(params, x, opt_state, fixed, np.int32(s),
                                    np.float32(schedule(local)),
                                    np.int32(jitter_limit(cfg, r, info.image_shape[0])),
                                    np.float32(tv_target))
      terms = {k: float(v) for k, v in jax.device_get(terms).items()}
      _finite_or_raise(s, terms)
      if bar is not None:
        bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)
        bar.update(1)
      if callback is not None:
        callback(s, terms)
      if mgr is not None and (s + 1) % cfg.checkpoint_every == 0 and s + 1 < cfg.iterations:
        g = jax.device_get
        checkpoint.save(mgr, s + 1, {
            "images": np.asarray(g(x))[:n], "mu": np.asarray(g(opt_state.mu))[:n],
            "nu": np.asarray(g(opt_state.nu))[:n],
            "count": np.asarray(g(opt_state.count), np.int32), "step": np.asarray(s + 1, np.int32)})
  finally:
    if bar is not None:
      bar.close()
  return np.asarray(jax.device_get(x))[:n].astype(np.float32)
