"""The synthesis objective: the weighted loss terms of one step (soft CE, APA, PSAQ-ViT's
patch entropy, MSR, batch TV) on the jittered images, and the achieved attention maps that
APA aligns with the priors."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from spdfq_jax.models import taps
from spdfq_jax.synth import losses, psaq_v2, regions
from spdfq_jax.synth.layout import ModelInfo

# Stream ids, one per kind of randomness, kept apart across the package: 1 initial images
# and 2 labels (draws.py), 3 priors (priors.py), 4 the steps' JAX key (objective.py),
# 5 the per-step plan (plan.py), 6 SMI's per-step plan (smi.py), 7 MimiQ's per-step plan
# and 8 its per-(step, image) augmentation key (mimiq.py).
_STEPS = 4


def apa_maps(module, params: Any, images: jax.Array, info: ModelInfo,
             blocks: tuple[int, ...]) -> list[jax.Array]:
  """Achieved attention per APA block as (B, heads, G) (Swin: also averaged over windows)."""
  _, attns, _ = taps.apply_with_attention(module, {"params": params}, images)
  out = []
  for l in blocks:
    m = losses.achieved_maps(attns[l], info.prefix, info.swin, images.shape[0])
    out.append(m.mean(1) if info.swin else m)
  return out


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


Student = Optional[tuple[Callable, dict]]  # (apply, variables) of PSAQ-ViT V2's student


def loss_terms(module, params: Any, x: jax.Array, fixed: dict, row: dict,
               cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...],
               student: Student = None
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """(terms, stats): weighted loss terms (batch means over valid images), whose sum is the
  objective, and what is watched but not optimised (`prior_fit`, the mean Pearson
  correlation of the APA maps with their priors).

  `row` is one step of the `Plan` (shift, flip, region_shift, region_flip, tv_target,
  step). Every whole-image term, TV included, reads the jittered image, as in PSAQ-ViT.
  With a `student` (PSAQ-ViT V2) the images also raise its disagreement with the model.
  """
  n_valid = jnp.maximum(fixed["mask"].sum(), 1.0)
  xa = augment(x, row["shift"], row["flip"])
  terms, stats = model_terms(module, params, x, xa, fixed, row, cfg, info, blocks, n_valid,
                             student)
  return {**terms, **pixel_terms(xa, fixed["mask"], row, cfg)}, stats


def model_terms(module, params: Any, x: jax.Array, xa: jax.Array, fixed: dict, row: dict,
                cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...],
                n_valid: jax.Array, student: Student = None
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
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
  if cfg.class_guidance:
    terms["ce"] = mean(losses.soft_cross_entropy(logits, fixed["targets"]))
  if student is not None:
    apply, variables = student
    terms["adversarial"] = mean(psaq_v2.adversarial_term(logits, apply(variables, xa), cfg))
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
