"""The integer model against the fake-quant model on the built-in test beds' test sets.

  python benchmarks/int_agreement.py [--beds fmnist_vit,fmnist_swin,scenes_vit]
      [--bits 8,6,4,3] [--out DIR] [--onnx]

Each bed model is quantized (preset 'reparam': calibration and scale reparameterisation;
reconstruction changes kernels, not the integer path) on 32 training images, exported to
DIR (kept for `spdfq_jax.tools.infer`), read back by `quant.integer_model.load`, and both
models, compiled, classify the whole test set. Printed per row: top-1 agreement, the
largest |logit difference| (and the largest |logit|), and both accuracies. --onnx also
writes the export's ONNX graph (`tools.export_onnx`) and runs it in ONNX Runtime on the same
images: its top-1 agreement with the integer model, their largest |logit difference|, and
its accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spdfq_jax import models, quant  # noqa: E402
from spdfq_jax.data import test_bed  # noqa: E402
from spdfq_jax.models import zoo  # noqa: E402
from spdfq_jax.quant import export, integer_model  # noqa: E402

BEDS = {"fmnist_vit": "fashion_mnist", "fmnist_swin": "fashion_mnist", "scenes_vit": "scenes"}


def agreement(bed: str, bits: int, out_dir: str, with_onnx: bool = False, batch: int = 500
              ) -> dict:
  module, params = models.load(bed)
  channels = zoo.in_channels(module, params)
  data = test_bed(BEDS[bed])
  calib = data.calibration_images(32, 0, None, channels)[0]
  cfg = quant.default_config(bits, bits, preset="reparam")
  qm = quant.quantize(module, params, calib, cfg, progress=False)
  path = os.path.join(out_dir, f"{bed}_w{bits}a{bits}.safetensors")
  export.save(path, qm)
  im = integer_model.load(path)
  x, y = data.load("test", None, channels)
  fq, it = [], []
  for i in range(0, len(x), batch):
    fq.append(np.asarray(qm.logits(x[i:i + batch])))
    it.append(np.asarray(im.logits(x[i:i + batch])))
  fq, it = np.concatenate(fq), np.concatenate(it)
  extra = {}
  if with_onnx:
    from spdfq_jax.deploy import onnx_runtime  # pylint: disable=g-import-not-at-top
    from spdfq_jax.tools import export_onnx  # pylint: disable=g-import-not-at-top
    onnx_path = path.replace(".safetensors", ".onnx")
    export_onnx.export(path, onnx_path)
    sess = onnx_runtime.session(onnx_path)
    ox = np.concatenate([onnx_runtime.logits(sess, x[i:i + batch])
                         for i in range(0, len(x), batch)])
    extra = {"onnx_vs_integer_top1_agreement_pct": round(
                 100 * float(np.mean(ox.argmax(1) == it.argmax(1))), 3),
             "onnx_vs_integer_max_abs_logit_diff": float(np.abs(ox - it).max()),
             "onnx_vs_integer_images_differing_over_1e-4": int(
                 np.sum(np.abs(ox - it).max(1) > 1e-4)),
             "onnx_top1": round(100 * float(np.mean(ox.argmax(1) == y)), 2)}
  return {"bed": bed, "bits": f"w{bits}a{bits}", "images": len(x),
          "top1_agreement_pct": round(100 * float(np.mean(fq.argmax(1) == it.argmax(1))), 3),
          "max_abs_logit_diff": float(np.abs(fq - it).max()),
          "max_abs_logit": float(np.abs(fq).max()),
          "images_differing_over_1e-4": int(np.sum(np.abs(fq - it).max(1) > 1e-4)),
          "fake_quant_top1": round(100 * float(np.mean(fq.argmax(1) == y)), 2),
          "integer_top1": round(100 * float(np.mean(it.argmax(1) == y)), 2), **extra,
          "export": path}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--beds", default=",".join(BEDS))
  p.add_argument("--bits", default="8,6,4,3")
  p.add_argument("--out", default="workdirs/int_agreement")
  p.add_argument("--onnx", action="store_true", help="also the ONNX graph in ONNX Runtime")
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
  for bed in a.beds.split(","):
    for bits in map(int, a.bits.split(",")):
      print(json.dumps(agreement(bed, bits, a.out, a.onnx)), flush=True)


if __name__ == "__main__":
  main()
