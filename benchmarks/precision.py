"""Synthesis step time with float32 vs bfloat16 matmuls (`synth.compute_dtype`), side by side.

  python benchmarks/precision.py [--models fmnist_vit,deit_tiny_patch16_224] [--iters 7]
      [--method spdfq] [--batch 32]

Random weights; both steps are compiled first, then timed alternately (the machine is
shared: alternating exposes both to the same background load); medians of --iters steps.
Also prints the relative difference of the step's total loss. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import step_util  # noqa: E402
from spdfq_jax import synth  # noqa: E402
from spdfq_jax.models import zoo  # noqa: E402


def compare(name: str, method: str, batch: int, iters: int) -> tuple[float, float, float]:
  """(float32 s, bfloat16 s, relative difference of the total loss) for one model."""
  module, shape = step_util.timing_model(name)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))["params"]
  runs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = synth.default_config(method, zoo.family(module))
    cfg.update(num_images=batch, compute_dtype=dtype)
    if shape[-1] == 1:
      cfg.update(mean=(0.5,), std=(0.5,))
    step, args = step_util.synth_step(module, params, cfg, donate=False)
    out = jax.block_until_ready(step(*args))  # compile + one warm run
    total = sum(float(v[5 % cfg.log_every]) for v in jax.device_get(out[3]["terms"]).values())
    runs[dtype] = (step, args, [], total)
  for _ in range(iters):
    for step, args, times, _ in runs.values():
      t = time.perf_counter()
      jax.block_until_ready(step(*args))
      times.append(time.perf_counter() - t)
  f32, b16 = runs["float32"], runs["bfloat16"]
  return (statistics.median(f32[2]), statistics.median(b16[2]),
          abs(b16[3] - f32[3]) / abs(f32[3]))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="fmnist_vit,deit_tiny_patch16_224")
  p.add_argument("--method", default="spdfq")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--iters", type=int, default=7)
  a = p.parse_args()
  print(f"Machine: {step_util.machine()}\n")
  print("| model | method | batch | float32 s/step | bfloat16 s/step | speed-up | "
        "total loss rel. diff |")
  print("|---|---|---|---|---|---|---|")
  for name in a.models.split(","):
    f32, b16, diff = compare(name, a.method, a.batch, a.iters)
    print(f"| {name} | {a.method} | {a.batch} | {f32:.3f} | {b16:.3f} | {f32 / b16:.2f}x | "
          f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
