"""Where SMI's images lose their class on a test bed: the FP model's class fit of the last
iterate, after the 8-bit round trip, after the final mask, and on the kept tokens alone,
and how far the reference's final ranking (on de-normalised pixels) agrees with a ranking
of the normalised image.

  python benchmarks/smi_fit.py [--bed fmnist] [--seed 0] [--iterations 300]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import synthesis as bench  # noqa: E402
from spdfq_jax.models import zoo  # noqa: E402
from spdfq_jax.synth import draws, layout, smi  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bed", default="fmnist", choices=sorted(bench.BEDS))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--iterations", type=int, default=300)
  a = p.parse_args()
  module, params, path = bench.load_asset("vit", a.bed)
  cfg = bench.bed_config("smi", "vit", a.bed, zoo.in_channels(module, params), a.seed,
                         a.iterations)
  info = layout.model_info(module, params, cfg)
  labels = draws.draw_labels(cfg, info)
  plan = smi.make_plan(cfg, info)
  last = smi.invert(module, params, cfg, info, draws.initial_images(cfg, info),
                    labels["targets"], plan, progress=False)
  predict = jax.jit(lambda x, k: module.apply({"params": params}, x, keep=k).argmax(-1))
  fit = lambda x, k=None: 100 * float((np.asarray(predict(jnp.asarray(x), k))
                                       == labels["classes"]).mean())
  images, kept = smi.final_mask(module, params, cfg, info, last, plan.final_keep)
  keep = np.concatenate([np.tile(np.arange(info.prefix), (len(kept), 1)), kept + info.prefix], 1)
  pixels = smi.denormalize(last, cfg.mean, cfg.std)
  rank = jax.jit(lambda v: smi.sparse_forward(module, params, v, None, info.prefix)[1])
  _, top = jax.lax.top_k(rank(jnp.asarray(last)), plan.final_keep)
  overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(np.asarray(top), kept)])
  print(f"{path}, seed {a.seed}, {a.iterations} steps, {plan.final_keep} of "
        f"{info.grid[0] ** 2} patches kept")
  print(f"class fit %: last iterate {fit(last):.0f}; after the 8-bit round trip "
        f"{fit(smi.png_round_trip(pixels, cfg.mean, cfg.std)):.0f}; masked {fit(images):.0f}; "
        f"kept tokens only {fit(images, jnp.asarray(keep)):.0f}")
  print(f"kept patches shared with a ranking of the normalised image: {100 * overlap:.0f}%")


if __name__ == "__main__":
  main()
