"""Full-precision training of the Fashion-MNIST scenes models (48x48 RGB, 12x12 patch grid).

  python -m spdfq_jax.tools.train_fp --config=configs/scenes_train.py:vit --workdir=runs/scenes_vit

Every epoch draws fresh scenes of the 60k training items (new positions, scales, colours
and clutter), which is the translation and scale augmentation; random flips on top.
spdfq_jax/assets/MODEL_CARD.md records the command, time and accuracy of the built-in asset.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import fmnist_train  # noqa: E402  pylint: disable=wrong-import-position

MODELS = {
    # DeiT-Tiny's shape, made smaller for a 2-core CPU: head width 32, MLP x4.
    "vit": dict(img_size=48, patch_size=4, width=96, depth=6, num_heads=3, mlp_ratio=4.0),
    "swin": dict(img_size=48, patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8),
                 window_size=6, mlp_ratio=4.0),
}


def get_config(arg: str = "vit") -> ml_collections.ConfigDict:
  """`arg` picks the architecture: 'vit' or 'swin'. The Fashion-MNIST recipe, with these
  differences: the scenes data (RGB), its model shapes, a longer warm-up, label smoothing."""
  if arg not in MODELS:
    raise ValueError(f"config arg must be one of {sorted(MODELS)}, got {arg!r}")
  c = fmnist_train.get_config(arg)
  c.dataset = "scenes"
  c.model = dict(MODELS[arg], num_classes=10)
  c.channels = 3
  c.warmup_steps = 300
  c.label_smoothing = 0.1
  c.crop_pad = 0  # positions and scales are already random in every scene
  return c
