"""Evaluates or times an exported quantized model on its own.

  python -m spdfq_jax.tools.infer EXPORTED.safetensors --config=configs/fmnist_w4a4.py
  python -m spdfq_jax.tools.infer EXPORTED.safetensors --config=configs/fmnist_w4a4.py \\
      --time --batch=8 --repeats=7
  python -m spdfq_jax.tools.infer MODEL.onnx --config=configs/fmnist_w4a4.py \\
      [--against=EXPORTED.safetensors] [--time]

The file is what the pipeline's export stage writes (`rows/<row>/quantized.safetensors`,
or `export_to`). Without --time it prints top-1 / top-5 on the config's evaluation data
(`data.*`, `eval.limit`, `eval.batch_size`) through the integer model (or, with
--path=fake, the fake-quant model the export also rebuilds), and the sizes: FP32 bytes of
the parameters, the file, and the weights the integer model holds in memory. With --time
it prints images/s of the integer, fake-quant and FP32 forward passes (FP32: the same
dequantized parameters with the quantizers off) on random images of the model's shape,
the median of --repeats compiled runs each, measured side by side.

A .onnx file (`spdfq_jax.tools.export_onnx`) runs in ONNX Runtime instead: top-1 / top-5
on the same data, or images/s with --time. --against=EXPORTED also runs that export's
integer model on the same images and prints their top-1 agreement and largest logit
difference (needs the `onnx` extra).
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
from spdfq_jax.quant import export, integer_model, qmodel

_PATH = flags.DEFINE_enum("path", "integer", ["integer", "fake"],
                          "Which model to evaluate: the integer one, or the fake-quant one.")
_TIME = flags.DEFINE_bool("time", False, "Time the forward passes instead of evaluating.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per timed forward pass.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per model (the median is printed).")
_AGAINST = flags.DEFINE_string("against", None, "With a .onnx file: the export whose integer "
                               "model it is compared with, image by image.")


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


def sizes(path: str, qm: qmodel.QuantizedModel, im: integer_model.IntegerModel) -> dict:
  """Bytes: FP32 parameters, the export file, the integer model's weights in memory."""
  fp32 = sum(4 * np.size(v) for v in jax.tree_util.tree_leaves(qm.variables["params"]))
  held = im.weight_bytes()
  return {"fp32_bytes": int(fp32), "file_bytes": os.path.getsize(path),
          "integer_weight_bytes": held["params"] + held["int_kernels"],
          "fp32_over_integer": round(fp32 / (held["params"] + held["int_kernels"]), 2)}


def eval_data(config, module, in_channels: int) -> Data:
  """The config's evaluation data, preprocessed for `module`."""
  if config.data.name in TEST_BEDS:
    pre = test_bed(config.data.name).preprocessing(in_channels)
  else:
    pre = preprocessing_of(config, module, {})
  data = Data(config, pre, in_channels)
  data.check(module, need_train=False)
  return data


def run_onnx(path: str, config, time_it: bool, batch: int, repeats: int,
             against: str | None) -> dict:
  """Top-1 / top-5 (or images/s) of an exported ONNX graph in ONNX Runtime."""
  try:
    from spdfq_jax.deploy import onnx_runtime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"running a .onnx file needs the onnx extra: pip install -e \".[onnx]\" "
                      f"({e})") from e
  sess = onnx_runtime.session(path)
  module, in_channels, num_classes = onnx_runtime.describe(path)
  out = {"file": path, "runtime": f"onnxruntime {onnx_runtime.ort.__version__}"}
  if time_it:
    images = np.random.RandomState(0).randn(batch, module.img_size, module.img_size,
                                             in_channels).astype(np.float32)
    secs = median_seconds(lambda x: onnx_runtime.logits(sess, x), images, repeats)
    return {**out, "batch": batch, "repeats": repeats, "images_per_s": round(batch / secs, 2)}
  data = eval_data(config, module, in_channels)
  batches, total = data.eval_batches()
  recorded = [] if against else None
  fn = onnx_runtime.jax_logits(sess, num_classes, recorded)
  if against:  # the integer model on the same batches; ONNX Runtime's logits are recorded
    im = integer_model.load(against)
    theirs, sizes = [], []
    def both(images):
      theirs.append(np.asarray(im.logits(images)))
      sizes.append(len(images))
      return images
    batches = ((both(x), y) for x, y in batches)
  t = time.perf_counter()
  result = evaluate.evaluate(fn, batches, config.eval.batch_size, total=total, desc="eval onnx")
  out.update(top1=float(result["top1"]), top5=float(result["top5"]),
             count=int(result["count"]), seconds=round(time.perf_counter() - t, 1))
  if against:  # each recorded batch is padded to the step's rows: its first `size` are real
    a = np.concatenate([r[:k] for r, k in zip(recorded, sizes)])
    b = np.concatenate(theirs)
    out.update(against=against,
               top1_agreement_pct=round(100 * float(np.mean(a.argmax(1) == b.argmax(1))), 3),
               max_abs_logit_diff=float(np.abs(a - b).max()),
               max_abs_logit=float(np.abs(b).max()))
  return out


def run(path: str, config, path_kind: str, time_it: bool, batch: int, repeats: int) -> dict:
  qm = export.load(path)
  im = integer_model.load(path)
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
  data = eval_data(config, qm.module, im.in_channels)
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
    sys.exit("usage: python -m spdfq_jax.tools.infer EXPORTED.safetensors|MODEL.onnx "
             "--config=CONFIG [--time] [--path=integer|fake] [--against=EXPORTED.safetensors]")
  try:
    if argv[1].endswith(".onnx"):
      out = run_onnx(argv[1], flags.FLAGS.config, _TIME.value, _BATCH.value, _REPEATS.value,
                     _AGAINST.value)
    elif _AGAINST.value:
      sys.exit("error: --against compares a .onnx file with an export; it was given "
               f"{argv[1]}")
    else:
      out = run(argv[1], flags.FLAGS.config, _PATH.value, _TIME.value, _BATCH.value,
                _REPEATS.value)
  except (InputError, ValueError, FileNotFoundError, ImportError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(run_command, flags_parser=main.parse_flags)
