"""Images/s of the FP32, fake-quant and integer models, side by side in one run.

  python benchmarks/int_inference.py [--models vit_small_patch16_224,...,fmnist_vit]
      [--bits 8,4] [--batches 1,8] [--repeats 7] [--torch /work/venv-torch/bin/python]
      [--matmul] [--attention_f32] [--round_zero] [--onnx]

Registry models get random weights at 224; the built-in bed models (fmnist_vit,
fmnist_swin, scenes_vit) their own. Each is quantized at W{b}A{b} (preset 'reparam',
calibrated on 2 random images: the speed does not depend on the ranges), and the three
forward passes (compiled, waiting for the result) run interleaved, --repeats times each
after one compiling run; the medians are printed with the ratios integer / FP32 and
integer / fake-quant, and the weight bytes each model holds. With --torch, the same timm
model through PyTorch's dynamic int8 quantization (benchmarks/int_inference_torch.py) in
that interpreter, after the JAX side (not at the same time, so they do not share the
cores). --onnx adds, interleaved with the JAX models, the FP32 graph of the same
dequantized weights and the quantized graph (`deploy.onnx_graph`) in ONNX Runtime, and
prints the kernels ONNX Runtime ran for the quantized graph (its profiler, one run at the
largest batch). --matmul first times one int8 x int8 -> int32 dot_general against float32 on
ViT-B's MLP shape (1576 x 768 x 3072).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from spdfq_jax import models, quant, report  # noqa: E402
from spdfq_jax.models import convert, zoo  # noqa: E402
from spdfq_jax.quant import integer, integer_model  # noqa: E402

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "deit_base_patch16_224",
          "swin_small_patch4_window7_224", "fmnist_vit", "fmnist_swin", "scenes_vit")


def interleaved_medians(fns: dict, x: jax.Array, repeats: int) -> dict:
  """Median seconds of each fn(x), runs interleaved so that load drift hits all alike."""
  for fn in fns.values():
    jax.block_until_ready(fn(x))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(x))
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def load(name: str):
  if name in convert.ASSETS:
    return models.load(name)
  module = zoo.build(name)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
  return module, jax.tree_util.tree_map(np.asarray, params)


def onnx_sessions(qm) -> dict:
  """name -> logits fn of the FP32 and the quantized ONNX graphs of `qm` (ONNX Runtime)."""
  from spdfq_jax.deploy import onnx_graph, onnx_runtime  # pylint: disable=g-import-not-at-top
  parts = integer_model.quantized_parts(qm)
  out = {}
  variants = [("onnx_fp32", True, False), ("onnx_quantized", False, False)]
  if qm.cfg.weights.bits == 8:  # int8 operands at 8 bits (exact where the kernel sums in int32)
    variants.append(("onnx_quantized_signed_8bit", False, True))
  for key, fp, signed in variants:
    sess = onnx_runtime.session(onnx_graph.build(parts, fp=fp, signed_8bit=signed))
    out[key] = lambda x, s=sess: onnx_runtime.logits(s, np.asarray(x))
  return out


def onnx_profile(qm, x: np.ndarray) -> dict:
  from spdfq_jax.deploy import onnx_graph, onnx_runtime  # pylint: disable=g-import-not-at-top
  return onnx_runtime.kernels_ran(onnx_graph.build(integer_model.quantized_parts(qm)), x)


def bench_model(name: str, bits: list[int], batches: list[int], repeats: int,
                attention_f32: bool = False, round_zero: bool = False,
                with_onnx: bool = False) -> list[dict]:
  module, params = load(name)
  size, channels = module.img_size, zoo.in_channels(module, params)
  fp32_bytes = sum(4 * np.size(v) for v in jax.tree_util.tree_leaves(params))
  calib = np.random.RandomState(0).randn(2, size, size, channels).astype(np.float32)
  fp = jax.jit(module.apply)
  rows = []
  for b in bits:
    cfg = quant.default_config(b, b, preset="reparam", w_method="minmax")
    qm = quant.quantize(module, params, calib, cfg, progress=False)
    im = integer_model.from_quantized(qm)
    held = im.weight_bytes()
    if round_zero:  # the same images, the zero point rounded: one matmul per linear layer
      rcfg = quant.default_config(b, b, preset="reparam", w_method="minmax")
      rcfg.reparam_round_zero = True
      rounded_qm = quant.quantize(module, params, calib, rcfg, progress=False)
      rounded = integer_model.from_quantized(rounded_qm)
    for batch in batches:
      x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, channels))
      fns = {"fp32": lambda v: fp({"params": params}, v), "fake_quant": qm.logits,
             "integer": im.logits}
      if attention_f32:  # the same integer model, its attention sums held in float32
        fns["integer_attn_f32"] = _f32_attention_logits(im)
      if round_zero:
        fns["integer_round_zero"] = rounded.logits
        if attention_f32:  # both steps together
          fns["integer_round_zero_attn_f32"] = _f32_attention_logits(rounded)
      if with_onnx:
        fns.update(onnx_sessions(qm))
        if round_zero:
          fns["onnx_quantized_round_zero"] = onnx_sessions(rounded_qm)["onnx_quantized"]
      secs = interleaved_medians(fns, x, repeats)
      rows.append({"model": name, "bits": f"w{b}a{b}", "batch": batch,
                   **{f"{k}_img_s": round(batch / s, 2) for k, s in secs.items()},
                   "integer_over_fp32": round(secs["fp32"] / secs["integer"], 2),
                   "integer_over_fake_quant": round(secs["fake_quant"] / secs["integer"], 2),
                   **{f"{k}_over_fp32": round(secs["fp32"] / secs[k], 2)
                      for k in ("integer_attn_f32", "integer_round_zero",
                                "integer_round_zero_attn_f32", "onnx_fp32", "onnx_quantized",
                                "onnx_quantized_round_zero", "onnx_quantized_signed_8bit")
                      if k in secs},
                   **({"onnx_quantized_over_onnx_fp32": round(
                       secs["onnx_fp32"] / secs["onnx_quantized"], 2)} if with_onnx else {}),
                   "fp32_weight_bytes": int(fp32_bytes),
                   "integer_weight_bytes": held["params"] + held["int_kernels"],
                   "fp32_over_integer_bytes": round(
                       fp32_bytes / (held["params"] + held["int_kernels"]), 2)})
      print(json.dumps(rows[-1]), flush=True)
    if with_onnx:
      x = np.random.RandomState(1).randn(max(batches), size, size, channels).astype(np.float32)
      print(json.dumps({"model": name, "bits": f"w{b}a{b}", "batch": max(batches),
                        "onnx_kernels": onnx_profile(qm, x)}), flush=True)
  return rows


def _f32_attention_logits(im: integer_model.IntegerModel):
  """im's forward, compiled with its attention sums in float32 (bit-identical)."""
  return functools.partial(jax.jit(functools.partial(_with_f32_attention, im.module)),
                           im.variables)


def _with_f32_attention(module, variables: dict, x: jax.Array) -> jax.Array:
  """The integer model's forward traced with integer.EXACT_FLOAT32_ATTENTION on."""
  integer.EXACT_FLOAT32_ATTENTION = True
  try:
    return module.apply(variables, x)
  finally:
    integer.EXACT_FLOAT32_ATTENTION = False


def bench_matmul(repeats: int) -> dict:
  """int8 x int8 -> int32 against float32 x float32 on ViT-B's fc1 at batch 8."""
  m, k, n = 8 * 197, 768, 3072
  rng = np.random.RandomState(0)
  a8 = jnp.asarray(rng.randint(-128, 128, (m, k)), jnp.int8)
  w8 = jnp.asarray(rng.randint(-128, 128, (k, n)), jnp.int8)
  af, wf = a8.astype(jnp.float32), w8.astype(jnp.float32)
  dims = (((1,), (0,)), ((), ()))
  fns = {
      "float32": jax.jit(lambda a, w: jax.lax.dot_general(a, w, dims)),
      "int8_int32": jax.jit(lambda a, w: jax.lax.dot_general(
          a, w, dims, preferred_element_type=jnp.int32)),
      "int8_int32_wT": jax.jit(lambda a, w: jax.lax.dot_general(
          a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)),
  }
  args = {"float32": (af, wf), "int8_int32": (a8, w8), "int8_int32_wT": (a8, w8.T.copy())}
  secs = interleaved_medians({k: (lambda _, f=f, a=args[k]: f(*a)) for k, f in fns.items()},
                             None, repeats)
  out = {"matmul": f"{m}x{k}x{n}", **{f"{k}_ms": round(1e3 * s, 1) for k, s in secs.items()},
         **{f"{k}_over_float32": round(secs["float32"] / s, 2) for k, s in secs.items()}}
  print(json.dumps(out), flush=True)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--bits", default="8,4")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--torch", default="", help="python with torch and timm (optional)")
  p.add_argument("--matmul", action="store_true")
  p.add_argument("--attention_f32", action="store_true",
                 help="also time the integer model with integer.EXACT_FLOAT32_ATTENTION")
  p.add_argument("--onnx", action="store_true",
                 help="also time the FP32 and quantized ONNX graphs in ONNX Runtime")
  p.add_argument("--round_zero", action="store_true",
                 help="also time the integer model of the same calibration with "
                      "reparam_round_zero=True (no second matmul for the fractional zero point)")
  a = p.parse_args()
  if a.repeats < 5:
    raise SystemExit("--repeats must be >= 5 (medians of at least five runs)")
  m = report.machine()
  print(json.dumps({"date": report.now(), "machine": m, "command": " ".join(sys.argv),
                    "loadavg_start": os.getloadavg()}), flush=True)
  if a.matmul:
    bench_matmul(a.repeats)
  names = [n for n in a.models.split(",") if n]
  for name in names:
    bench_model(name, [int(b) for b in a.bits.split(",")],
                [int(b) for b in a.batches.split(",")], a.repeats, a.attention_f32,
                a.round_zero, a.onnx)
  timm_names = [n for n in names if n in zoo.REGISTRY]
  if a.torch and timm_names:
    subprocess.run([a.torch, os.path.join(ROOT, "benchmarks", "int_inference_torch.py"),
                    "--models", ",".join(timm_names), "--batches", a.batches,
                    "--repeats", str(a.repeats)], check=True)
  print(json.dumps({"loadavg_end": os.getloadavg()}), flush=True)


if __name__ == "__main__":
  main()
