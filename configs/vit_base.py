"""ViT-B/16 (vit_base_patch16_224): SPDFQ, 32 synthetic images, bits from the config argument.

  python -m spdfq_jax.main --config=configs/vit_base.py:w4a4 \
      --config.model.checkpoint=checkpoints/vit_base_patch16_224.augreg_in21k_ft_in1k/model.safetensors \
      --config.data.dir=data/imagenet

Paper, ImageNet top-1 (%): FP 84.54; W4A4 SPDFQ 51.84 (PSAQ-ViT 36.32, noise 0.15); W6A6
SPDFQ 79.16 (PSAQ-ViT 76.65); W3A3 not reported.
Other methods on the same quantization stage: --config.methods=noise,psaq,spdfq.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = "w4a4"):
  return common.paper_model_config("vit_base", arg)
