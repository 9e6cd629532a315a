"""Every calibration source on the built-in Fashion-MNIST ViT, at W4A4 and W3A3, one table.

  python -m spdfq_jax.main --config=configs/fmnist_compare.py

Rows: Gaussian noise, plain inversion (CE + TV), PSAQ-ViT, PSAQ-ViT V2 (from its paper; no
reference code), SPDFQ (APA + MSR + SL), SMI (sparse model inversion; ViT only), MimiQ
(heads' attention made alike), and 32 real training images as the upper reference;
all 32 images, all through the same (best) quantization stage: scale reparameterisation +
block-wise reconstruction, with the demo's 100 synthesis steps. `benchmarks/synthesis.py accuracy` measures the same comparison over
seeds and at longer runs; README.md and BENCHMARKS.md hold its tables, next to
the paper's ImageNet table, whose ordering (noise < PSAQ-ViT < SPDFQ < real) is what this
small test bed can check.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import fmnist_w4a4  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  return common.comparison(fmnist_w4a4.get_config(arg),
                           "Fashion-MNIST ViT: calibration sources at W4A4 and W3A3")
