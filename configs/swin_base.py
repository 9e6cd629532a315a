"""Swin-B (swin_base_patch4_window7_224): SPDFQ, 32 synthetic images, bits from the config argument.

  python -m spdfq_jax.main --config=configs/swin_base.py:w4a4 \
      --config.model.checkpoint=checkpoints/swin_base_patch4_window7_224.ms_in22k_ft_in1k/model.safetensors \
      --config.data.dir=data/imagenet

Paper, ImageNet top-1 (%): FP 85.27; W4A4 SPDFQ 76.42 (PSAQ-ViT 71.84, noise 30.14); W6A6
SPDFQ 83.03 (PSAQ-ViT 82.00); W3A3 not reported.
Other methods on the same quantization stage: --config.methods=noise,psaq,spdfq.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = "w4a4"):
  return common.paper_model_config("swin_base", arg)
