"""The compiled synthesis step: one batch-sharded Adam update of the pixels, the model terms
optionally in microbatches, the step's terms written to an on-device log buffer."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spdfq_jax import parallel
from spdfq_jax.synth import psaq_v2
from spdfq_jax.synth.layout import ModelInfo, pixel_range
from spdfq_jax.synth.objective import augment, loss_terms, model_terms, pixel_terms
from spdfq_jax.synth.plan import plan_row


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
              mesh, student_apply: Optional[Callable] = None) -> Callable:
  """The jitted step (params, x, adam, fixed, table, t, log, student) ->
  (x, adam, t + 1, log, student): one Adam update of the pixels at step t's lr (`table` =
  `Plan.table()` on the device), every channel then clipped to its valid pixel range, and
  the step's {'terms', 'stats'} written to row t % K of the (K,)-long `log` buffers.
  Nothing leaves the device.

  With `student_apply` (PSAQ-ViT V2) `student` is the student's state (psaq_v2): the pixels
  also raise its disagreement with the model, then it takes one step on the new pixels
  (stat 'student_kd'); otherwise `student` is None.

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

  def gradient(params, x, fixed, row, student):
    if parts == 1:
      return _sum_grad(lambda x: loss_terms(net, params, x, fixed, row, cfg, info, blocks,
                                            student), x)
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

  def step(params, x, opt_state, fixed, table, t, log, student):
    row = plan_row(table, t)
    pair = (student_apply, student["variables"]) if student is not None else None
    grad, (terms, stats) = gradient(params, x, fixed, row, pair)
    updates, opt_state = adam.update(grad, opt_state)
    x = jnp.clip(x - row["lr"] * updates, lo, hi)
    if student is not None:  # the student's turn, on the images just updated
      xa = augment(x, row["shift"], row["flip"])
      student, stats["student_kd"] = psaq_v2.student_step(
          student_apply, cfg, student, net.apply({"params": params}, xa), xa, fixed["mask"])
    k = jax.tree_util.tree_leaves(log)[0].shape[0]
    log = jax.tree_util.tree_map(lambda buf, v: buf.at[t % k].set(v), log,
                                 {"terms": terms, "stats": stats})
    return x, opt_state, t + 1, log, student

  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  opt_sh = optax.ScaleByAdamState(count=rep, mu=batch, nu=batch)
  return jax.jit(step, in_shardings=(rep, batch, opt_sh, batch, rep, rep, rep, rep),
                 out_shardings=(batch, opt_sh, rep, rep, rep), donate_argnums=(1, 2, 5, 6, 7))


def empty_log(module, params: Any, x: Any, fixed: dict, table: dict,
              cfg: ml_collections.ConfigDict, info: ModelInfo, blocks: tuple[int, ...],
              student_apply: Optional[Callable] = None, student: Optional[dict] = None
              ) -> dict:
  """Zeroed host buffers for the step's log: (log_every,) per term and stat."""
  def shapes(p, x, f, tb, s):
    pair = (student_apply, s["variables"]) if s is not None else None
    terms, stats = loss_terms(module, p, x, f, plan_row(tb, 0), cfg, info, blocks, pair)
    if s is not None:
      stats = {**stats, "student_kd": jnp.zeros((), jnp.float32)}
    return terms, stats
  terms, stats = jax.eval_shape(shapes, params, x, fixed, table, student)
  zeros = lambda s: np.zeros((cfg.log_every,) + s.shape, s.dtype)
  return jax.tree_util.tree_map(zeros, {"terms": terms, "stats": stats})
