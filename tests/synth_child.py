"""Child process for the synthesis tests: one run on a tiny model, config overrides as JSON.

usage: python synth_child.py WORKDIR OVERRIDES_JSON [SLEEP_PER_STEP]
"""
import json
import sys
import time

import jax
import numpy as np

from spdfq_jax import synth
from spdfq_jax.models import zoo
from spdfq_jax.quant import student


def tiny_vit():
  return zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=2,
                        num_heads=2, distilled=True)


def tiny_params(module):
  return jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]


# SMI on the tiny distilled ViT: 16 -> 11 -> 7 -> 4 patch tokens at steps 3, 6, 9, so the
# checkpoints at steps 4 and 8 hold pruned token lists.
SMI = {"method": "smi", "smi_prune_at": (3, 6, 9), "smi_prune_ratio": (0.3, 0.3, 0.3)}
# PSAQ-ViT V2 with a W4A4 student, without the patch entropy: the entropy's sharp KDE turns
# the devices' float rounding, through the 4-bit student's rounding, into images 0.47 apart
# after 2 steps on 1 vs 4 devices (7e-7 without it; the entropy's own padding is tested with
# PSAQ-ViT). The adversarial game amplifies rounding too: 12 steps on 1 vs 4 devices end
# 8e-5 apart at the default student lr 1e-5, 3e-3 at 1e-4 and 0.3 at 1e-3, with or without
# padding (4 images on 4 devices: 3.6 at 1e-3).
PSAQ_V2 = {"method": "psaq_v2", "v2_w_bits": 4, "v2_a_bits": 4, "entropy": False}
# MimiQ on the tiny distilled ViT: rolls of up to 2 px (steps 0-5), then 4 px, per axis.
MIMIQ = {"method": "mimiq", "jitter": (2, 4), "jitter_reference": 0}


def tiny_config(method="spdfq", **overrides):
  cfg = synth.default_config(method)
  cfg.num_images = 5
  cfg.iterations = 12
  cfg.warmup = 2
  cfg.checkpoint_every = 4
  cfg.update(overrides)
  return cfg


def generate(module, params, cfg, **kw):
  """synth.generate, with PSAQ-ViT V2's student built as the pipeline builds it."""
  if cfg.method == "psaq_v2":
    kw["student"] = student.student(module, params, cfg.v2_w_bits, cfg.v2_a_bits)
  return synth.generate(module, params, cfg, **kw)


def main():
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
  module = tiny_vit()
  cfg = tiny_config(overrides.pop("method", "spdfq"), **overrides)
  callback = (lambda s, t: time.sleep(sleep)) if sleep else None
  generate(module, tiny_params(module), cfg, workdir=workdir, progress=False,
           callback=callback)
  print("devices", jax.device_count())


if __name__ == "__main__":
  main()
