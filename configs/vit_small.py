"""ViT-S/16 (vit_small_patch16_224): SPDFQ, 32 synthetic images, bits from the config argument.

  python -m spdfq_jax.main --config=configs/vit_small.py:w4a4 \
      --config.model.checkpoint=checkpoints/vit_small_patch16_224.augreg_in21k_ft_in1k/model.safetensors \
      --config.data.dir=data/imagenet

Paper, ImageNet top-1 (%): FP 81.39; W4A4 SPDFQ 50.32 (PSAQ-ViT 47.24, noise 6.02); W6A6
SPDFQ 78.40 (PSAQ-ViT 77.20); W3A3 not reported.
Other methods on the same quantization stage: --config.methods=noise,psaq,spdfq.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = "w4a4"):
  return common.paper_model_config("vit_small", arg)
