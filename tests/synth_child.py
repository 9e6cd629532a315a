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


def tiny_vit():
  return zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=2,
                        num_heads=2, distilled=True)


def tiny_params(module):
  return jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]


# SMI on the tiny distilled ViT: 16 -> 11 -> 7 -> 4 patch tokens at steps 3, 6, 9, so the
# checkpoints at steps 4 and 8 hold pruned token lists.
SMI = {"method": "smi", "smi_prune_at": (3, 6, 9), "smi_prune_ratio": (0.3, 0.3, 0.3)}
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


def main():
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
  module = tiny_vit()
  cfg = tiny_config(overrides.pop("method", "spdfq"), **overrides)
  callback = (lambda s, t: time.sleep(sleep)) if sleep else None
  synth.generate(module, tiny_params(module), cfg, workdir=workdir, progress=False,
                 callback=callback)
  print("devices", jax.device_count())


if __name__ == "__main__":
  main()
