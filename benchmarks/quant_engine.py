"""Quantization engine on the built-in models: accuracy per bit setting and stage.

  python benchmarks/quant_engine.py --models=vit,swin --out=/tmp/quant_engine.json
  python benchmarks/quant_engine.py --models=scenes_vit --bits=w8a8,w4a4 --out=/tmp/qe_scenes.json

Models: vit, swin (the Fashion-MNIST assets fmnist_vit, fmnist_swin) and scenes_vit (the
scenes test bed's; its real calibration images are `scenes.calibration_images`).

For every model: FP top-1, then W8A8, W6A6, W4A4, W3A3 with (a) calibration only
(preset 'calib'), (b) + post-LN reparameterisation ('reparam'), (c) + block-wise
reconstruction ('full'); calibration = 32 real training images, mean and std over 3
draws (seeds). Then the noise-to-real gap: N(0, 1) images as the calibration set at
W4A4 and W3A3, (b) and (c). Results are appended to the JSON file as they come (a rerun
skips what is there) and printed as the markdown tables of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from spdfq_jax import checkpoint, data, quant  # noqa: E402
from spdfq_jax.models import native, zoo  # noqa: E402
from spdfq_jax.quant import qmodel  # noqa: E402

ASSETS = os.path.join(os.path.dirname(__file__), "..", "spdfq_jax", "assets")
BITS = ((8, 8), (6, 6), (4, 4), (3, 3))
STAGES = (("calib", "(a) calibration"), ("reparam", "(b) + reparam"),
          ("full", "(c) + reconstruction"))


def top1(module, variables, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
  correct = 0
  for i in range(0, len(images), batch):
    logits = qmodel.apply_jit(module, variables, jnp.asarray(images[i:i + batch]))
    correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == labels[i:i + batch]))
  return 100.0 * correct / len(images)


def calib_set(source: str, seed: int, n: int, train: np.ndarray, shape) -> np.ndarray:
  rng = np.random.RandomState(seed)
  if source == "real":
    return train[rng.choice(len(train), n, replace=False)]
  return rng.randn(n, *shape).astype(np.float32)


def test_bed_of(name: str) -> str:
  return "scenes" if name.startswith("scenes") else "fashion_mnist"


def run_model(name: str, path: str, args, results: dict, save) -> None:
  module, params, _ = native.load(path)
  c = zoo.in_channels(module, params)
  fmnist = test_bed_of(name) == "fashion_mnist"
  bed = data.test_bed(test_bed_of(name))
  test_x, test_y = bed.load("test", None, c)
  if args.test_examples:
    test_x, test_y = test_x[:args.test_examples], test_y[:args.test_examples]
  train_x = bed.load("train", None, c)[0] if fmnist else None
  ev = lambda m, v: top1(m, v, test_x, test_y, args.batch)  # noqa: E731
  if f"{name}/fp" not in results:
    results[f"{name}/fp"] = ev(module, {"params": params})
    save()
  print(f"{name} FP {results[f'{name}/fp']:.2f}", flush=True)
  bits = [wa for wa in BITS if wa in args.bits]
  jobs = [(s, "real", wa) for s in range(args.seeds) for wa in bits]
  jobs += [(s, "noise", wa) for s in range(args.seeds) for wa in ((4, 4), (3, 3)) if wa in bits]
  for seed, source, (w, a) in jobs:
    keys = {st: f"{name}/{source}/{st}/w{w}a{a}/{seed}" for st, _ in STAGES}
    todo = [st for st in keys if st in args.stages and keys[st] not in results]
    if source == "noise":
      todo = [st for st in todo if st != "calib"]
    if (w, a) in args.no_recon_bits:
      todo = [st for st in todo if st != "full"]
    if not todo:
      continue
    if source == "real" and not fmnist:
      images = bed.calibration_images(args.num_calib, seed, None, c)[0]
    else:  # (the Fashion-MNIST draw predates calibration_images and is kept as it was)
      images = calib_set(source, seed, args.num_calib, train_x, test_x.shape[1:])
    t0 = time.time()
    if "calib" in todo:
      cfg = quant.default_config(w, a, preset="calib", **args.overrides)
      qs = quant.calibrate(module, params, images, cfg)
      qm = quant.build(module, params, qs, quant.weight_state(params, cfg), cfg)
      results[keys["calib"]] = ev(qm.module, qm.variables)
    if "reparam" in todo or "full" in todo:
      cfg = quant.default_config(w, a, preset="full", recon_iters=args.recon_iters,
                                 seed=seed, **args.overrides)
      qs = quant.calibrate(module, params, images, cfg)
      p, qs = quant.reparameterize(params, qs, cfg)
      ws = quant.weight_state(p, cfg)
      qm = quant.build(module, p, qs, ws, cfg)
      if "reparam" in todo:
        results[keys["reparam"]] = ev(qm.module, qm.variables)
      if "full" in todo:
        p2, log = quant.reconstruct(module, p, qs, ws, images, cfg, progress=False)
        qm = quant.build(module, p2, qs, ws, cfg)
        results[keys["full"]] = ev(qm.module, qm.variables)
        results[keys["full"] + "/log"] = log
    save()
    got = " ".join(f"{st}={results[keys[st]]:.2f}" for st in todo)
    print(f"{name} {source} W{w}A{a} seed {seed}: {got} ({time.time() - t0:.0f}s)", flush=True)


def _stat(results: dict, prefix: str) -> str:
  vals = [v for k, v in results.items() if k.startswith(prefix + "/") and not k.endswith("log")
          and k.count("/") == prefix.count("/") + 1]
  if not vals:
    return "-"
  n = "" if len(vals) == 3 else f" (n={len(vals)})"
  return f"{np.mean(vals):.2f} ± {np.std(vals):.2f}{n}"


def tables(results: dict, models: list[str], bits=BITS) -> str:
  out = []
  for name in models:
    if f"{name}/fp" not in results:
      continue
    out.append(f"\n**{name}** (FP {results[f'{name}/fp']:.2f}), real calibration images\n")
    out.append("| stage | " + " | ".join(f"W{w}A{a}" for w, a in bits) + " |")
    out.append("|---" * (len(bits) + 1) + "|")
    for st, label in STAGES:
      out.append(f"| {label} | " + " | ".join(_stat(results, f"{name}/real/{st}/w{w}a{a}")
                                               for w, a in bits) + " |")
    out.append(f"\n**{name}**, noise-to-real gap (N(0, 1) calibration images)\n")
    out.append("| setting | real | noise | gap |")
    out.append("|---|---|---|---|")
    for w, a in [wa for wa in ((4, 4), (3, 3)) if wa in bits]:
      for st, label in STAGES[1:]:
        r, n = (_stat(results, f"{name}/{src}/{st}/w{w}a{a}") for src in ("real", "noise"))
        gap = "-"
        rv = [results.get(f"{name}/real/{st}/w{w}a{a}/{s}") for s in range(3)]
        nv = [results.get(f"{name}/noise/{st}/w{w}a{a}/{s}") for s in range(3)]
        if all(v is not None for v in rv + nv):
          gap = f"{np.mean(rv) - np.mean(nv):.2f}"
        out.append(f"| W{w}A{a} {label} | {r} | {n} | {gap} |")
  return "\n".join(out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="vit,swin")
  ap.add_argument("--out", default="/tmp/quant_engine.json")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--num_calib", type=int, default=32)
  ap.add_argument("--recon_iters", type=int, default=100)
  ap.add_argument("--stages", default="calib,reparam,full")
  ap.add_argument("--bits", default="w8a8,w6a6,w4a4,w3a3", help="bit settings to run")
  ap.add_argument("--no_recon_bits", default="",
                  help="bit settings that skip reconstruction, e.g. w8a8 (nothing to recover)")
  ap.add_argument("--test_examples", type=int, default=0, help="0 = all 10,000")
  ap.add_argument("--batch", type=int, default=1000)
  ap.add_argument("--set", action="append", default=[],
                  help="quant config override KEY=VALUE (JSON value), e.g. a_method='\"mse\"'")
  ap.add_argument("--path", action="append", default=[],
                  help="NAME=PATH: another checkpoint for a model (default: the package asset)")
  ap.add_argument("--table_only", action="store_true")
  args = ap.parse_args()
  args.stages = args.stages.split(",")
  parse = lambda spec: [(int(b[1]), int(b[3])) for b in spec.split(",") if b]  # noqa: E731
  args.bits, args.no_recon_bits = parse(args.bits), parse(args.no_recon_bits)
  args.overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
  results = json.load(open(args.out)) if os.path.exists(args.out) else {}

  def save():
    checkpoint.write_text(args.out, json.dumps(results, indent=1))

  models = args.models.split(",")
  paths = {m: os.path.join(ASSETS, f"{m if m.startswith('scenes') else 'fmnist_' + m}"
                               ".safetensors") for m in models}
  paths.update(dict(p.split("=", 1) for p in args.path))
  if not args.table_only:
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}",
          flush=True)
    for name in models:
      run_model(name, paths[name], args, results, save)
  print(tables(results, models, [wa for wa in BITS if wa in args.bits]))


if __name__ == "__main__":
  main()
