"""ViT-B/16 (vit_base_patch16_224.augreg_in21k_ft_in1k) at W4A4 with SPDFQ, 32 synthetic images.

  python -m spdfq_jax.main --config=configs/vitb_w4a4.py \
      --config.model.checkpoint=checkpoints/vit_base_patch16_224.augreg_in21k_ft_in1k/model.safetensors \
      --config.data.dir=data/imagenet

Paper, ImageNet top-1 (%): SPDFQ 51.84 (FP 84.54, PSAQ-ViT 36.32, noise 0.15, real data
68.16). The same as configs/vit_base.py:w4a4.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  del arg
  return common.paper_model_config("vit_base", "w4a4")
