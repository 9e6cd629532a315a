"""Evaluates or times an exported quantized model on its own.

  python -m spdfq_jax.tools.infer EXPORTED.safetensors --config=configs/fmnist_w4a4.py
  python -m spdfq_jax.tools.infer EXPORTED.safetensors --config=configs/fmnist_w4a4.py \\
      --time --batch=8 --repeats=7

The file is what the pipeline's export stage writes (`rows/<row>/quantized.safetensors`,
or `export_to`). Without --time it prints top-1 / top-5 on the config's evaluation data
(`data.*`, `eval.limit`, `eval.batch_size`) through the integer model (or, with
--path=fake, the fake-quant model the export also rebuilds), and the sizes: FP32 bytes of
the parameters, the file, and the weights the integer model holds in memory. With --time
it prints images/s of the integer, fake-quant and FP32 forward passes (FP32: the same
dequantized parameters with the quantizers off) on random images of the model's shape,
the median of --repeats compiled runs each, measured side by side.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable

from absl import app, flags
import jax
import numpy as np

from spdfq_jax import evaluate, main
from spdfq_jax.data import TEST_BEDS, test_bed
from spdfq_jax.data.dataset import Data
from spdfq_jax.fp_model import preprocessing_of
from spdfq_jax.inputs import InputError
from spdfq_jax.quant import export, integer, qmodel

_PATH = flags.DEFINE_enum("path", "integer", ["integer", "fake"],
                          "Which model to evaluate: the integer one, or the fake-quant one.")
_TIME = flags.DEFINE_bool("time", False, "Time the forward passes instead of evaluating.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per timed forward pass.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per model (the median is printed).")


def median_seconds(fn: Callable[[jax.Array], jax.Array], images: jax.Array, repeats: int
                   ) -> float:
  """Median wall time of `fn(images)`, waiting for the result, after one compiling run."""
  jax.block_until_ready(fn(images))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(images))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def sizes(path: str, qm: qmodel.QuantizedModel, im: integer.IntegerModel) -> dict:
  """Bytes: FP32 parameters, the export file, the integer model's weights in memory."""
  fp32 = sum(4 * np.size(v) for v in jax.tree_util.tree_leaves(qm.variables["params"]))
  held = im.weight_bytes()
  return {"fp32_bytes": int(fp32), "file_bytes": os.path.getsize(path),
          "integer_weight_bytes": held["params"] + held["int_kernels"],
          "fp32_over_integer": round(fp32 / (held["params"] + held["int_kernels"]), 2)}


def run(path: str, config, path_kind: str, time_it: bool, batch: int, repeats: int) -> dict:
  qm = export.load(path)
  im = integer.load(path)
  out = {"file": path, "w_bits": qm.cfg.weights.bits, "a_bits": qm.cfg.acts.bits,
         **sizes(path, qm, im)}
  if time_it:
    shape = (batch, qm.module.img_size, qm.module.img_size, im.in_channels)
    images = jax.random.normal(jax.random.PRNGKey(0), shape)
    fp = qmodel.quant_module(qm.module, qm.cfg, "fp")
    runs = {"integer": im.logits, "fake-quant": qm.logits,
            "fp32": lambda x: qmodel.apply_jit(fp, {"params": qm.variables["params"]}, x)}
    secs = {k: median_seconds(fn, images, repeats) for k, fn in runs.items()}
    out.update(batch=batch, repeats=repeats,
               images_per_s={k: round(batch / s, 2) for k, s in secs.items()},
               integer_over_fp32=round(secs["fp32"] / secs["integer"], 2),
               integer_over_fake_quant=round(secs["fake-quant"] / secs["integer"], 2))
    return out
  if config.data.name in TEST_BEDS:
    pre = test_bed(config.data.name).preprocessing(im.in_channels)
  else:
    pre = preprocessing_of(config, qm.module, {})
  data = Data(config, pre, im.in_channels)
  data.check(qm.module, need_train=False)
  batches, total = data.eval_batches()
  fn = im.logits if path_kind == "integer" else qm.logits
  t = time.perf_counter()
  result = evaluate.evaluate(fn, batches, config.eval.batch_size, total=total,
                             desc=f"eval {path_kind}")
  out.update(path=path_kind, top1=float(result["top1"]), top5=float(result["top5"]),
             count=int(result["count"]), seconds=round(time.perf_counter() - t, 1))
  return out


def run_command(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit("usage: python -m spdfq_jax.tools.infer EXPORTED.safetensors --config=CONFIG "
             "[--time] [--path=integer|fake]")
  try:
    out = run(argv[1], flags.FLAGS.config, _PATH.value, _TIME.value, _BATCH.value,
              _REPEATS.value)
  except (InputError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(run_command, flags_parser=main.parse_flags)
