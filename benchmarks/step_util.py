"""One synthesis step ready to call, for the benchmarks that time or measure it."""
from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from spdfq_jax import parallel
from spdfq_jax.models import zoo
from spdfq_jax.synth import draws as draws_lib
from spdfq_jax.synth import layout as layout_lib
from spdfq_jax.synth import plan as plan_lib
from spdfq_jax.synth import step as step_lib

FMNIST_VIT = dict(num_classes=10, img_size=32, patch_size=4, width=96, depth=6, num_heads=4)


def machine() -> str:
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{datetime.date.today().isoformat()}")


def timing_model(name: str):
  """(module, image shape) with random weights: the Fashion-MNIST ViT or a registry model."""
  if name == "fmnist_vit":
    return zoo.custom_vit(**FMNIST_VIT), (32, 32, 1)
  return zoo.build(name), (224, 224, 3)


def random_params(module, shape: tuple[int, int, int]) -> Any:
  """Random-initialised parameters of `module` for images of `shape` (timing runs)."""
  return jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1,) + shape, np.float32))["params"]


def synth_step(module, params: Any, cfg: ml_collections.ConfigDict, donate: bool = True
               ) -> tuple[Callable, tuple]:
  """(jitted step, its arguments at step 5) on one device, random labels and priors.

  With `donate` the step consumes its image, Adam, counter and log arguments: call it
  as `args = advance(args, step(*args))`. Without, the same arguments can be reused.
  PSAQ-ViT V2 gets a W4A4 student (`cfg.v2_*_bits` when set); MimiQ runs its own step (no
  student argument, so `advance` does not apply to it)."""
  info = layout_lib.model_info(module, params, cfg)
  blocks = layout_lib.apa_block_indices(info, cfg) if cfg.apa else ()
  labels = draws_lib.draw_labels(cfg, info)
  pri = draws_lib.draw_priors(module, params, cfg, info, blocks, None) if cfg.apa else []
  mesh = parallel.data_mesh()
  rep = parallel.replicated(mesh)
  n = cfg.num_images
  fixed = parallel.shard_batch({"index": np.arange(n, dtype=np.int32),
                                "mask": np.ones(n, np.float32), "targets": labels["targets"],
                                "region_targets": labels["region_targets"], "priors": pri}, mesh)
  x0 = draws_lib.initial_images(cfg, info)
  x = parallel.shard_batch(x0, mesh)
  state = optax.ScaleByAdamState(jax.device_put(np.int32(0), rep),
                                 parallel.shard_batch(np.zeros_like(x0), mesh),
                                 parallel.shard_batch(np.zeros_like(x0), mesh))
  params = jax.device_put(params, rep)
  t = jax.device_put(np.int32(5), rep)
  if cfg.method == "mimiq":
    from spdfq_jax.synth import mimiq  # noqa: PLC0415
    table = jax.device_put(mimiq.make_plan(cfg, info).table(), rep)
    log = jax.device_put({k: np.zeros(cfg.log_every, np.float32) for k in mimiq.TERMS}, rep)
    step = mimiq.make_step(module, cfg, info, mesh)
    return (step if donate else jax.jit(step.__wrapped__)), (params, x, state, fixed, table, t,
                                                             log)
  table = jax.device_put(plan_lib.make_plan(cfg, info).table(), rep)
  apply, student = None, None
  if cfg.method == "psaq_v2":
    from spdfq_jax.quant import student as quant_student  # noqa: PLC0415
    from spdfq_jax.synth import psaq_v2  # noqa: PLC0415
    bits = (cfg.v2_w_bits or 4, cfg.v2_a_bits or 4)
    built = quant_student.student(module, params, *bits)
    apply, student = built.apply, jax.device_put(psaq_v2.initial_state(built, cfg, x0), rep)
  log = jax.device_put(step_lib.empty_log(module, params, x, fixed, table, cfg, info, blocks,
                                          apply, student), rep)
  step = step_lib.make_step(module, cfg, info, blocks, mesh, apply)
  if not donate:
    step = jax.jit(step.__wrapped__)
  return step, (params, x, state, fixed, table, t, log, student)


def advance(args: tuple, out: tuple) -> tuple:
  """The next step's arguments from a step's outputs (x, adam, t, log, student)."""
  params, _, _, fixed, table, _, _, _ = args
  x, state, t, log, student = out
  return params, x, state, fixed, table, t, log, student
