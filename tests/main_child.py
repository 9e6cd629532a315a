"""Child process for the pipeline tests: `main.run` on a tiny model with the real synthesis
and quantization, on as many devices as XLA_FLAGS gives; prints the counts as JSON.

usage: python main_child.py WORKDIR NUM_IMAGES
"""
import json
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import fmnist_w4a4  # noqa: E402  pylint: disable=wrong-import-position
from spdfq_jax import main, quant, synth  # noqa: E402  pylint: disable=wrong-import-position
from spdfq_jax.models import zoo  # noqa: E402  pylint: disable=wrong-import-position


def tiny_pipeline(depth: int = 1):
  """(stages, config): the real synthesis and quantization on a tiny random 32 px ViT, with
  the demo's config (unlocked) to cut down."""
  module = zoo.custom_vit(img_size=32, patch_size=8, width=16, depth=depth, num_heads=2,
                          num_classes=10)
  params = jax.jit(module.init)(jax.random.PRNGKey(0),
                                np.zeros((1, 32, 32, 1), np.float32))["params"]
  stages = main.default_stages()
  stages.load_model = lambda name, path=None: (module, params)
  stages.generate = lambda m, p, cfg, workdir=None: synth.generate(
      m, p, cfg, workdir=workdir, progress=False)
  stages.quantize = lambda m, p, x, cfg, workdir=None: quant.quantize(
      m, p, x, cfg, workdir=workdir, progress=False)
  c = fmnist_w4a4.get_config()
  c.unlock()
  return stages, c


# What may differ between two runs of the same config: where and when they ran.
VOLATILE = ("timings", "row_dir", "synth_dir", "export", "workdir", "date", "total_seconds",
            "load_seconds", "fp_eval_seconds", "machine", "command")


def stable(report: dict) -> dict:
  """The report without VOLATILE fields: what two runs of one config must agree on."""
  strip = lambda d: {k: v for k, v in d.items() if k not in VOLATILE}
  return dict(strip(report), rows=[strip(r) for r in report["rows"]])


def run(workdir: str, num_images: int) -> dict:
  stages, c = tiny_pipeline()
  c.methods, c.num_images, c.export = "inversion", num_images, False
  c.synth.iterations, c.synth.warmup = 2, 1
  c.quant.recon.iters = 0  # quantization does not shard; the synthesis and evaluation do
  c.eval.limit, c.eval.batch_size = 7, 4
  out = main.run(c, workdir, stages)
  images = np.load(os.path.join(out["synth_dir"], main.SET_FILE))["images"]
  return {"devices": jax.device_count(), "num_images": out["num_images"],
          "set": int(len(images)), "eval_count": out["eval_count"],
          "finite": bool(np.isfinite(images).all())}


if __name__ == "__main__":
  print(json.dumps(run(sys.argv[1], int(sys.argv[2]))))
