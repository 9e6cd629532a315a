"""Every calibration source on the built-in scenes ViT, at W4A4 and W3A3, one table.

  python -m spdfq_jax.main --config=configs/scenes_compare.py

Rows: Gaussian noise, plain inversion (CE + TV), PSAQ-ViT, SPDFQ (APA + MSR + SL), SMI
(sparse model inversion; ViT only), MimiQ (heads' attention made alike), and 32 real training scenes as the upper reference;
all through scale reparameterisation and block-wise reconstruction.
`benchmarks/synthesis.py accuracy --bed scenes` measures the same comparison over seeds; README.md and BENCHMARKS.md hold its tables.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import scenes_w4a4  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  return common.comparison(scenes_w4a4.get_config(arg),
                           "Fashion-MNIST scenes ViT: calibration sources at W4A4 and W3A3")
