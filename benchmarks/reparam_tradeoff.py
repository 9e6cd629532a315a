"""Where post-LN reparameterisation gains and loses, on one calibration draw.

  python benchmarks/reparam_tradeoff.py [--model swin] [--seed 0]

At W3A3 and W8A3: (a) per-tensor post-LN activation ranges, per-channel ranges left as
they are (exact but not deployable), and per-channel ranges folded into the LayerNorm and
the next layer (RepQ-ViT). With W8 weights folding must cost nothing (it is exact on the
activation side); with W3 weights the difference is the cost of quantizing the folded
kernels diag(r1) W. Prints one markdown table (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import quant_engine as qe  # noqa: E402

from spdfq_jax import quant  # noqa: E402
from spdfq_jax.data import fashion_mnist  # noqa: E402
from spdfq_jax.models import native, zoo  # noqa: E402

VARIANTS = (("(a) per-tensor post-LN activations", "calib", False),
            ("per-channel post-LN, not folded (not deployable)", "reparam", False),
            ("(b) per-channel, folded into LN + next layer", "reparam", True))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--model", default="swin", choices=["vit", "swin"])
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  module, params, _ = native.load(os.path.join(qe.ASSETS, f"fmnist_{args.model}.safetensors"))
  c = zoo.in_channels(module, params)
  test_x, test_y = fashion_mnist.load("test", channels=c)
  train_x, _ = fashion_mnist.load("train", channels=c)
  images = qe.calib_set("real", args.seed, 32, train_x, None)
  print(f"| W?A3 variant ({args.model}, seed {args.seed}) | W3 weights | W8 weights |")
  print("|---|---|---|")
  for label, preset, fold in VARIANTS:
    accs = []
    # Activation ranges do not depend on the weight bits: calibrate once per variant.
    qs0 = quant.calibrate(module, params, images, quant.default_config(8, 3, preset=preset))
    for w in (3, 8):
      cfg = quant.default_config(w, 3, preset=preset)
      qs, p = qs0, params
      if fold:
        p, qs = quant.reparameterize(params, qs, cfg)
      qm = quant.build(module, p, qs, quant.weight_state(p, cfg), cfg)
      accs.append(qe.top1(qm.module, qm.variables, test_x, test_y, 1000))
    print(f"| {label} | {accs[0]:.2f} | {accs[1]:.2f} |", flush=True)


if __name__ == "__main__":
  main()
