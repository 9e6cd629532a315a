"""Peak host memory of one SPDFQ synthesis step (with MSR) on CPU, one configuration per
child process, with and without `remat` / `microbatches`.

  python benchmarks/memory.py [--models deit_small_patch16_224,vit_base_patch16_224,
      swin_base_patch4_window7_224] [--batch 32] [--variants plain,remat,micro4,micro8,remat+micro4]
      [--limit-gb 14]

Each child builds the registry model with random weights at 224 x 224, compiles the
step, reads XLA's own account of the compiled step (arguments + outputs + temporaries,
less the donated buffers it reuses) as the estimate, and runs ONE step only when that
estimate is below --limit-gb; it reports its peak RSS (`ru_maxrss`) after compiling and
after the step, and on an accelerator the allocator's peak device memory. Prints a markdown table (the ## Memory section of BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 2 ** 30
VARIANTS = {"plain": (False, 1), "remat": (True, 1), "micro4": (False, 4),
            "micro8": (False, 8), "remat+micro4": (True, 4)}


def peak_rss() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def child(model: str, batch: int, variant: str, limit_gb: float) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import step_util  # pylint: disable=g-import-not-at-top
  from spdfq_jax import synth  # pylint: disable=g-import-not-at-top
  from spdfq_jax.models import zoo  # pylint: disable=g-import-not-at-top

  remat, parts = VARIANTS[variant]
  module = zoo.build(model)
  params = jax.jit(module.init)(jax.random.PRNGKey(0),
                                np.zeros((1, 224, 224, 3), np.float32))["params"]
  cfg = synth.default_config("spdfq", zoo.entry(model).family)
  cfg.update(num_images=batch, remat=remat, microbatches=parts)
  step, args = step_util.synth_step(module, params, cfg)
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  m = compiled.memory_analysis()
  estimate = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes) / GB
  out = {"model": model, "batch": batch, "variant": variant, "xla_gb": round(estimate, 2),
         "temp_gb": round(m.temp_size_in_bytes / GB, 2), "compile_s": round(time.perf_counter() - t0, 1),
         "rss_compiled_gb": round(peak_rss(), 2)}
  if estimate > limit_gb:
    out["skipped"] = f"XLA estimate {estimate:.1f} GB > {limit_gb} GB"
    return out
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  out.update(step_s=round(time.perf_counter() - t0, 1), rss_step_gb=round(peak_rss(), 2))
  stats = jax.devices()[0].memory_stats() or {}  # accelerators: the allocator's peak
  if "peak_bytes_in_use" in stats:
    out["device_peak_gb"] = round(stats["peak_bytes_in_use"] / GB, 2)
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="deit_small_patch16_224,vit_base_patch16_224,"
                 "swin_base_patch4_window7_224")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--variants", default="plain,remat,micro4,remat+micro4")
  p.add_argument("--limit-gb", type=float, default=14.0)
  p.add_argument("--child", action="store_true")
  a = p.parse_args()
  if a.child:
    print("RESULT " + json.dumps(child(a.models, a.batch, a.variants, a.limit_gb)), flush=True)
    return
  print("| model | variant | XLA estimate GB (temp) | peak RSS after compile GB | "
        "peak RSS after one step GB | device peak GB | step s |")
  print("|---|---|---|---|---|---|---|")
  for model in a.models.split(","):
    for variant in a.variants.split(","):
      cmd = [sys.executable, os.path.abspath(__file__), "--child", "--models", model,
             "--batch", str(a.batch), "--variants", variant, "--limit-gb", str(a.limit_gb)]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if not lines:
        print(f"| {model} | {variant} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | |",
              flush=True)
        continue
      r = json.loads(lines[0][len("RESULT "):])
      step = r.get("rss_step_gb", r.get("skipped"))
      print(f"| {model} | {variant} | {r['xla_gb']} ({r['temp_gb']}) | {r['rss_compiled_gb']} | "
            f"{step} | {r.get('device_peak_gb', '-')} | {r.get('step_s', '-')} |", flush=True)


if __name__ == "__main__":
  main()
