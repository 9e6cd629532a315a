"""Is APA achieved? Class fit and prior fit of SPDFQ images over alpha1 and step count.

  python benchmarks/apa_fit.py [--families vit,swin] [--alphas 0,100,1000,10000,100000]
      [--iterations 100,300] [--num-images 8] [--seed 0] [--bed fmnist|scenes]
      [--synth jitter=0:0,apa_follows_jitter=True]

For every (family, iterations, alpha1) it synthesises SPDFQ images on a built-in test bed's
model with that bed's settings (configs/fmnist_w4a4.py or configs/scenes_w4a4.py; alpha1 0 =
APA off, the priors still drawn and measured; `--synth` overrides them) and prints, from
`SynthResult.diagnostics`: class fit (share of images, and of MSR regions, the FP model
assigns to their targets), prior fit (mean Pearson correlation of the APA blocks' CLS
attention with the priors) and its chance level (the same against priors the images never
saw), per-block prior fit, and the synthesis time. Every criterion is data-free: no real
image is read. The rule for the APA weight: the largest alpha1 whose class fit stays >= 95%
(images and regions) while its prior fit is well above chance.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spdfq_jax import synth  # noqa: E402
from spdfq_jax.models import zoo  # noqa: E402
from synthesis import BEDS, bed_config, load_asset, machine, parse_overrides, tag_value  # noqa: E402


def fit_row(family: str, alpha1: float, iterations: int, num_images: int, seed: int,
            workroot: str, bed: str = "fmnist", overrides: dict | None = None) -> dict:
  module, params, _ = load_asset(family, bed)
  cfg = bed_config("spdfq", family, bed, zoo.in_channels(module, params), seed, iterations)
  cfg.update(num_images=num_images, alpha1=float(alpha1) or 1.0, apa=alpha1 > 0)
  cfg.update(**(overrides or {}))
  tag = (("" if bed == "fmnist" else f"{bed}-")
         + f"{family}-n{num_images}-s{seed}-it{iterations}-a{alpha1:g}"
         + "".join(f"-{k}{tag_value(v)}" for k, v in sorted((overrides or {}).items())))
  t = time.perf_counter()
  res = synth.generate(module, params, cfg, workdir=os.path.join(workroot, tag), progress=False)
  return dict(res.diagnostics, seconds=time.perf_counter() - t)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--families", default="vit,swin")
  p.add_argument("--alphas", default="0,100,1000,10000,100000")
  p.add_argument("--iterations", default="100,300")
  p.add_argument("--num-images", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workroot", default="runs/apa_fit")
  p.add_argument("--bed", default="fmnist", choices=sorted(BEDS))
  p.add_argument("--synth", default="", help="synthesis overrides, e.g. jitter=0:0")
  a = p.parse_args()
  overrides = parse_overrides(a.synth)
  print(f"Machine: {machine()}; {a.bed} bed, {a.num_images} images, seed {a.seed}; "
        f"overrides {overrides or '-'}\n")
  print("| model | steps | alpha1 | class fit (images / regions) | prior fit | chance "
        "| prior fit per block | s |")
  print("|---|---|---|---|---|---|---|---|")
  for family in a.families.split(","):
    for iterations in (int(v) for v in a.iterations.split(",")):
      for alpha1 in (float(v) for v in a.alphas.split(",")):
        d = fit_row(family, alpha1, iterations, a.num_images, a.seed, a.workroot, a.bed,
                    overrides)
        per_block = " / ".join(f"{sum(b) / len(b):.2f}" for b in d["prior_fit_per_block"])
        print(f"| {family} | {iterations} | {alpha1:g} | {100 * d['class_fit']:.0f}% / "
              f"{100 * d.get('region_class_fit', float('nan')):.0f}% | {d['prior_fit']:.3f} | "
              f"{d['prior_fit_chance']:.3f} | {per_block} | {d['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
