"""DeiT-S/16 (deit_small_patch16_224): SPDFQ, 32 synthetic images, bits from the config argument.

  python -m spdfq_jax.main --config=configs/deit_small.py:w4a4 \
      --config.model.checkpoint=checkpoints/deit_small_patch16_224.fb_in1k/model.safetensors \
      --config.data.dir=data/imagenet

Paper, ImageNet top-1 (%): FP 79.85; W4A4 SPDFQ 62.29 (PSAQ-ViT 58.28, noise 20.89); W6A6
SPDFQ 77.31 (PSAQ-ViT 75.85); W3A3 not reported.
Other methods on the same quantization stage: --config.methods=noise,psaq,spdfq.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = "w4a4"):
  return common.paper_model_config("deit_small", arg)
