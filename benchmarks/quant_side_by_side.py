"""I&S-ViT's quantization stages and this package's, side by side on the Fashion-MNIST ViT.

  python benchmarks/quant_side_by_side.py [--reference /path/to/IaS-ViT --commit SHA
      --torch-python /path/to/venv-torch/bin/python] [--bits w4a4,w3a3] [--iters 100]
      [--calib 32] [--test 2000]

The built-in `fmnist_vit` is written as a timm VisionTransformer (logits checked equal), the
same `--calib` real training images (`fashion_mnist.calibration_images(n, seed 0)`) calibrate
both, and top-1 is measured on the first `--test` test images. Per bit setting:
  calib+reparam   activations calibrated, reparameterised, weights quantized; no reconstruction
  + recon         the full stage with `--iters` iterations per unit (each reconstruction stage)
with the wall time of each. The reference runs only with `--reference` and
`--torch-python` (an environment with torch and timm; it runs in that interpreter, this
package in this one): its own `test_quant.py` `main()` with the adaptations of
tests/fixtures/make_quant_reference.py (`--side-run`), plus one forced by 32 images: its
reconstruction batch (64, hard-coded) is capped at the number of images, since
`int(32 / 64)` batches would cache nothing. Its Swin-only stochastic depth does not arise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from spdfq_jax import quant  # noqa: E402
from spdfq_jax.data import fashion_mnist  # noqa: E402
from spdfq_jax.models import layouts, native  # noqa: E402

ASSET = os.path.join(ROOT, "spdfq_jax", "assets", "fmnist_vit.safetensors")


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels) * 100)


def ours(module, params, calib, test, labels, w: int, a: int, iters: int) -> dict:
  out = {}
  for stage, it in (("calib+reparam", 0), ("+ recon", iters)):
    t = time.perf_counter()
    qm = quant.quantize(module, params, calib, quant.default_config(w, a, recon_iters=it),
                       progress=False)
    logits = np.concatenate([np.asarray(qm.logits(test[i:i + 500]))
                             for i in range(0, len(test), 500)])
    out[stage] = (top1(logits, labels), time.perf_counter() - t)
  return out


def reference(python: str, ref_dir: str, commit: str, module, params, calib, test, labels,
              w: int, a: int, iters: int) -> dict:
  """Runs the reference in `python` (a torch + timm environment) on the same model and images."""
  kw = dict(img_size=module.img_size, patch_size=module.patch_size, in_chans=calib.shape[-1],
            embed_dim=module.width, depth=module.depth, num_heads=module.num_heads,
            mlp_ratio=module.mlp_ratio, num_classes=module.num_classes)
  with tempfile.TemporaryDirectory() as tmp:
    job, out = os.path.join(tmp, "job.npz"), os.path.join(tmp, "out.npz")
    np.savez(job, timm_kwargs=np.array(json.dumps(kw)), calib=calib, test=test, w_bits=w,
             a_bits=a, iters=iters, **{"sd/" + k: v for k, v in layouts.vit_to_timm(params).items()})
    subprocess.run([python, os.path.join(ROOT, "tests", "fixtures", "make_quant_reference.py"),
                    "--reference", ref_dir, "--commit", commit, "--side-run", job, out],
                   check=True, stdout=subprocess.DEVNULL)
    with np.load(out) as f:
      r = dict(f)
  return {"calib+reparam": (top1(r["calib_logits"], labels), float(r["calib_seconds"])),
          "+ recon": (top1(r["recon_logits"], labels), float(r["recon_seconds"]))}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reference", help="an IaS-ViT checkout (never copied)")
  ap.add_argument("--commit", default="9300cea8db6292d9d3d6727321c7f1100360e191")
  ap.add_argument("--torch-python", help="python of an environment with torch and timm")
  ap.add_argument("--bits", default="w4a4,w3a3")
  ap.add_argument("--iters", type=int, default=100)
  ap.add_argument("--calib", type=int, default=32)
  ap.add_argument("--test", type=int, default=2000)
  args = ap.parse_args()
  module, params, _ = native.load(ASSET)
  calib, _ = fashion_mnist.calibration_images(args.calib, 0)
  test, labels = fashion_mnist.load("test")
  test, labels = test[:args.test], labels[:args.test]
  have_ref = bool(args.reference and args.torch_python
                  and os.path.isfile(os.path.join(args.reference, "test_quant.py")))
  print(f"# {platform.node()} {time.strftime('%Y-%m-%d')} jax {jax.__version__}, "
        f"{args.calib} calibration images, first {args.test} test images, "
        f"{args.iters} iterations per unit")
  print("| bits | stage | I&S-ViT code | this package | I&S-ViT s | this package s |")
  print("|---|---|---|---|---|---|")
  for bits in args.bits.split(","):
    w, a = int(bits[1]), int(bits[3])
    mine = ours(module, params, calib, test, labels, w, a, args.iters)
    print(f"# this package, W{w}A{a}: " + ", ".join(f"{k} {acc:.2f} ({sec:.0f} s)"
                                                  for k, (acc, sec) in mine.items()),
          file=sys.stderr, flush=True)
    ref = (reference(args.torch_python, args.reference, args.commit, module, params, calib,
                     test, labels, w, a, args.iters) if have_ref else {})
    for stage, (acc, sec) in mine.items():
      r_acc, r_sec = ref.get(stage, (float("nan"), float("nan")))
      print(f"| W{w}A{a} | {stage} | {r_acc:.2f} | {acc:.2f} | {r_sec:.0f} | {sec:.0f} |",
            flush=True)


if __name__ == "__main__":
  main()
