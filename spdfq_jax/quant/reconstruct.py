"""Block-wise reconstruction: recover accuracy unit by unit with the FP model as teacher.

For each unit of `zoo.units(module)` (embed, every block, head) in forward order, the
unit's weights are trained so that the quantized unit, fed the quantized model's own
inputs (the outputs of the already reconstructed units), reproduces the FP unit's output
on the FP model's inputs:  min ||unit_fp(x_fp) - unit_q(x_q)||^2 (I&S-ViT's stage three).
With `fp_inputs` the quantized unit is fed the FP model's inputs instead (its stage one,
run with FP weights: an empty weight state).
Adam with cosine decay; weights are fake-quantized inside the loss with frozen ranges
(straight-through gradients reach the latent FP weights); activation ranges are frozen.
`recon.train`: 'no_norm' (I&S-ViT) trains every parameter of the unit but LayerNorm affine,
tokens and position table; 'all' those too; 'kernels' only the kernels. `recon.loss`:
'sum_dim1' (I&S-ViT) sums the squared error over axis 1 and averages the rest; 'mean'.

With a workdir the loop saves (params, next unit) after every unit and resumes there. On
SIGTERM it stops after the current step: the unit it was training (at most `recon.iters`
steps) is redone from its start on resume, which gives the same weights as an unbroken run.
A loss that stops being finite ends the run at once (FloatingPointError naming the unit,
the step and the last good checkpoint) instead of saving NaN weights.

Each step's batch is drawn from `recon.seed`, the unit's index and the step. `draws` replaces
those draws with given image indices (one `(iters, batch)` integer array per unit), so that
another implementation's batches can be replayed step for step; off (None) by default.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from spdfq_jax import checkpoint, interrupt
from spdfq_jax.models import zoo
from spdfq_jax.quant import qmodel
from spdfq_jax.quant import weights

FROZEN_LEAVES = ("cls_token", "dist_token", "pos_embed")


def get_subtree(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def set_subtree(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  """A copy of tree with tree[path] = value (copies only the dicts along the path)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = set_subtree(tree[path[0]], path[1:], value)
  return out


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _apply_unit(module: zoo.Model, name: str, variables: dict, x: jax.Array,
                method: str = "run_unit") -> jax.Array:
  return module.apply(variables, name, x, method=method)


def run_unit(module: zoo.Model, variables: dict, name: str, x: jax.Array, chunk_size: int,
             method: str = "run_unit") -> jax.Array:
  """One unit over all of x, in chunks (`method` 'unit_target': what its loss matches)."""
  return jnp.concatenate([_apply_unit(module, name, variables, x[i:i + chunk_size], method)
                          for i in range(0, x.shape[0], chunk_size)])


class NonFiniteLoss(FloatingPointError):
  """A unit's loss (or, after its last update, its weights) stopped being finite at `step`
  (0-based)."""

  def __init__(self, unit: str, step: int, value: float, iters: int, what: str = "loss"):
    self.unit, self.step, self.value, self.iters = unit, step, value, iters
    detail = f"loss is {value}" if what == "loss" else "weights are not finite"
    super().__init__(f"reconstruction of unit {unit!r}: the {detail} at step {step + 1} "
                     f"of {iters}")


def first_nonfinite(values: np.ndarray) -> Optional[int]:
  """Index of the first NaN / inf in `values`, or None."""
  bad = np.flatnonzero(~np.isfinite(values))
  return int(bad[0]) if bad.size else None


def _stop_message(err: NonFiniteLoss, units: list, workdir: Optional[str], mgr: Any,
                  cfg: ml_collections.ConfigDict) -> str:
  done = [name for name, _ in units[:[n for n, _ in units].index(err.unit)]]
  if mgr is None:
    saved = "none: without a workdir nothing is saved"
  elif mgr.latest_step() is None:
    saved = f"none yet in {workdir} (no unit had finished)"
  else:
    step = mgr.latest_step()
    saved = (f"{os.path.join(os.path.abspath(workdir), str(step))} (units "
             f"{', '.join(done[:step]) or '-'} done); a restart resumes there")
  return (f"{err}. Stopped before saving NaN weights. Last good checkpoint: {saved}. Lower "
          f"quant.recon.lr (now {cfg.recon.lr:g}) or check that the calibration images are "
          "finite and in the model's input range.")


def reconstruct(module: zoo.Model, params: Any, qstate: dict, wstate: dict,
                images: np.ndarray, cfg: ml_collections.ConfigDict,
                workdir: Optional[str] = None, progress: bool = True,
                teacher: Any = None, fp_inputs: bool = False,
                draws: Optional[Sequence[np.ndarray]] = None) -> tuple[dict, list[dict]]:
  """(latent params after reconstruction, per-unit loss log).

  `params` are the (possibly reparameterised) params training starts from; `teacher` the FP
  params whose unit outputs are the targets (default: `params`). The returned params are
  latent: pass them through `weights.quantize_weights` (or `qmodel.build`) to get the
  deployed fake-quantized kernels. `draws`: per unit of `zoo.units(module)`, the image
  indices of each step's batch, `(recon.iters, batch)` (None: drawn from `recon.seed`).
  """
  r = cfg.recon
  chunk = cfg.calib.chunk_size
  frozen = ml_collections.FrozenConfigDict(cfg)
  qmod = qmodel.quant_module(module, cfg)
  units = zoo.units(module)
  if draws is not None:
    draws = [np.asarray(d) for d in draws]
    if len(draws) != len(units) or any(d.ndim != 2 or d.shape[0] != r.iters for d in draws):
      raise ValueError(f"draws: one (recon.iters={r.iters}, batch) index array per unit "
                       f"({len(units)}), got shapes {[d.shape for d in draws]}")
  # Everything the steps read goes to the device once, here.
  student, qstate, wstate = jax.device_put((params, qstate, wstate))
  teacher = student if teacher is None else jax.device_put(teacher)
  x_fp = x_q = jax.device_put(np.asarray(images, np.float32))
  start = 0
  mgr = checkpoint.manager(workdir) if workdir else None
  if mgr is not None:
    found = checkpoint.restore_latest(mgr, {"params": student, "next": np.asarray(0, np.int32)})
    if found is not None:
      student, start = found[1]["params"], int(found[1]["next"])
  log = []
  for i, (name, paths) in enumerate(units):
    y_fp = run_unit(module, {"params": teacher}, name, x_fp, chunk)
    if i >= start and r.iters > 0:
      method = zoo.unit_target_method(module, name)
      target = y_fp if method == "run_unit" else run_unit(module, {"params": teacher}, name,
                                                          x_fp, chunk, method)
      try:
        student, entry = _train_unit(qmod, name, paths, student, qstate, wstate, cfg,
                                     x_q, target, i, progress,
                                     None if draws is None else draws[i])
      except NonFiniteLoss as e:
        raise FloatingPointError(_stop_message(e, units, workdir, mgr, cfg)) from None
      log.append(entry)
    if fp_inputs:
      x_q = y_fp
    elif i + 1 < len(units) or mgr is not None:
      qvars = {"params": _quantize_weights(frozen, student, wstate), "quant": qstate}
      x_q = run_unit(qmod, qvars, name, x_q, chunk)
    x_fp = y_fp
    if mgr is not None and i >= start:
      checkpoint.save(mgr, i + 1, {"params": student, "next": np.asarray(i + 1, np.int32)})
  return student, log


def trains(train: str, path: tuple[str, ...]) -> bool:
  """Whether `recon.train` trains the parameter at `path` (names of a unit's param tree)."""
  if train == "all":
    return True
  if train == "kernels":
    return path[-1] == "kernel"
  return path[-1] not in FROZEN_LEAVES and not any(k.startswith("norm") for k in path)


def _optimizer(cfg: ml_collections.FrozenConfigDict, trainable: dict
               ) -> optax.GradientTransformation:
  r = cfg.recon
  tx = optax.adam(optax.cosine_decay_schedule(r.lr, r.iters))
  if r.train == "all":
    return tx
  # A unit path can itself be a leaf (the class token, the position table): judge the full
  # path, not only the keys inside the subtree.
  mask = {p: jax.tree_util.tree_map_with_path(
      lambda kp, _, p=p: trains(r.train, p + tuple(k.key for k in kp)), t)
          for p, t in trainable.items()}
  return optax.chain(optax.masked(tx, mask),
                     optax.masked(optax.set_to_zero(),
                                  jax.tree_util.tree_map(lambda m: not m, mask)))


def unit_loss(qmod: zoo.Model, name: str, cfg: ml_collections.FrozenConfigDict, trainable: dict,
              frozen: dict, qstate: dict, wstate: dict, x: jax.Array, y: jax.Array
              ) -> jax.Array:
  """The reconstruction loss of unit `name` with `trainable` set into the `frozen` params:
  its quantized output on x (`zoo.unit_target_method`) against the FP targets y
  (`recon.loss`)."""
  full = frozen
  for p, sub in trainable.items():
    full = set_subtree(full, p, sub)
  qp = weights.quantize_weights(full, wstate, cfg)
  out = qmod.apply({"params": qp, "quant": qstate}, name, x,
                   method=zoo.unit_target_method(qmod, name))
  if cfg.recon.loss == "sum_dim1":
    return jnp.mean(jnp.sum((out - y) ** 2, axis=1))
  return jnp.mean((out - y) ** 2)


def _update(qmod: zoo.Model, name: str, cfg: ml_collections.FrozenConfigDict, trainable: dict,
            opt_state: Any, frozen: dict, qstate: dict, wstate: dict, x: jax.Array,
            y: jax.Array) -> tuple[dict, Any, jax.Array]:
  """One Adam step on the batch (x, y): the body shared by the drawn and replayed steps."""
  loss, g = jax.value_and_grad(unit_loss, argnums=3)(qmod, name, cfg, trainable, frozen, qstate,
                                                     wstate, x, y)
  updates, opt_state = _optimizer(cfg, trainable).update(g, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _step(qmod: zoo.Model, name: str, cfg: ml_collections.FrozenConfigDict, trainable: dict,
          opt_state: Any, frozen: dict, qstate: dict, wstate: dict, key: jax.Array,
          xs: jax.Array, ys: jax.Array) -> tuple[dict, Any, jax.Array]:
  """One Adam step on a random batch: MSE between quantized and FP unit outputs.

  Consumes (donates) `trainable` and `opt_state`; every argument already lives on the
  device, so a step sends nothing and the loss stays there until the loop reads it."""
  n = xs.shape[0]
  bs = min(cfg.recon.batch_size, n)
  idx = jax.random.choice(key, n, (bs,), replace=False)
  return _update(qmod, name, cfg, trainable, opt_state, frozen, qstate, wstate, xs[idx], ys[idx])


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _step_drawn(qmod: zoo.Model, name: str, cfg: ml_collections.FrozenConfigDict,
                trainable: dict, opt_state: Any, frozen: dict, qstate: dict, wstate: dict,
                idx: jax.Array, xs: jax.Array, ys: jax.Array) -> tuple[dict, Any, jax.Array]:
  """`_step` on a given batch of image indices (`reconstruct`'s `draws`)."""
  return _update(qmod, name, cfg, trainable, opt_state, frozen, qstate, wstate, xs[idx], ys[idx])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def step_keys(seed: int, index: int, iters: int) -> list[jax.Array]:
  """The batch key of every step of unit `index`, made on the device at once."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(iters))
  return [keys[i] for i in range(iters)]


@functools.partial(jax.jit, static_argnums=0)
def _start(cfg: ml_collections.FrozenConfigDict, trainable: dict) -> tuple[dict, Any]:
  """A copy of the unit's trainable params (the step consumes it; the model's params keep
  theirs) and its fresh Adam state."""
  trainable = jax.tree_util.tree_map(jnp.copy, trainable)
  return trainable, _optimizer(cfg, trainable).init(trainable)


@functools.partial(jax.jit, static_argnums=0)
def _quantize_weights(cfg: ml_collections.FrozenConfigDict, params: dict, wstate: dict) -> dict:
  return weights.quantize_weights(params, wstate, cfg)


@jax.jit
def _stack(losses: list[jax.Array]) -> jax.Array:
  return jnp.stack(losses)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(v).all() for v in jax.tree_util.tree_leaves(tree)]))


def _train_unit(qmod: zoo.Model, name: str, paths: list[tuple[str, ...]], params: dict,
                qstate: dict, wstate: dict, cfg: ml_collections.ConfigDict, x_q: jax.Array,
                y_fp: jax.Array, index: int, progress: bool,
                draws: Optional[np.ndarray] = None) -> tuple[dict, dict]:
  """Trains one unit; the losses are read every `recon.log_every` steps (one transfer
  per block), and a non-finite one raises `NonFiniteLoss` with its step. `draws`: the
  batch indices of each step, replayed instead of drawn."""
  r = cfg.recon
  frozen_cfg = ml_collections.FrozenConfigDict(cfg)
  trainable, opt_state = _start(frozen_cfg, {p: get_subtree(params, p) for p in paths})
  if draws is None:
    step, keys = _step, step_keys(r.seed, index, r.iters)
  else:
    step, keys = _step_drawn, list(jax.device_put(np.asarray(draws, np.int32)))
  first = last = None
  bar = tqdm(total=r.iters, desc=f"recon {name}", leave=False, disable=not progress)
  for start in range(0, r.iters, r.log_every):
    pending = []
    for i, key in enumerate(keys[start:start + r.log_every]):
      trainable, opt_state, loss = step(qmod, name, frozen_cfg, trainable, opt_state, params,
                                        qstate, wstate, key, x_q, y_fp)
      pending.append(loss)
      if interrupt.requested():  # the checkpoint of the last finished unit is the resume point
        raise interrupt.Stopped(f"reconstruction of unit {name!r}", start + i + 1)
    values = np.asarray(jax.device_get(_stack(pending)), np.float64)
    bad = first_nonfinite(values)
    if bad is not None:
      bar.close()
      raise NonFiniteLoss(name, start + bad, float(values[bad]), r.iters)
    first = values[0] if first is None else first
    last = values[-1]
    bar.update(len(values))
    bar.set_postfix(loss=f"{last:.4g}")
  bar.close()
  if not jax.device_get(_all_finite(trainable)):
    raise NonFiniteLoss(name, r.iters - 1, float("nan"), r.iters, what="weights")
  for p, sub in trainable.items():
    params = set_subtree(params, p, sub)
  return params, {"unit": name, "loss_first": float(first), "loss_last": float(last)}
