"""Full-precision training of the Fashion-MNIST scenes models (48x48 RGB, 12x12 patch grid).

  python -m spdfq_jax.tools.train_fp --config=configs/scenes_train.py:vit --workdir=runs/scenes_vit

Every epoch draws fresh scenes of the 60k training items (new positions, scales, colours
and clutter), which is the translation and scale augmentation; random flips on top.
spdfq_jax/assets/MODEL_CARD.md records the command, time and accuracy of the built-in asset.
"""
import ml_collections

MODELS = {
    # DeiT-Tiny's shape, made smaller for a 2-core CPU: head width 32, MLP x4.
    "vit": dict(img_size=48, patch_size=4, width=96, depth=6, num_heads=3, mlp_ratio=4.0),
    "swin": dict(img_size=48, patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8),
                 window_size=6, mlp_ratio=4.0),
}


def get_config(arg: str = "vit") -> ml_collections.ConfigDict:
  """`arg` picks the architecture: 'vit' or 'swin'."""
  if arg not in MODELS:
    raise ValueError(f"config arg must be one of {sorted(MODELS)}, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.dataset = "scenes"
  c.family = arg
  c.model = dict(MODELS[arg], num_classes=10)
  c.data_dir = ""          # empty: /usr/share/datasets/fashion-mnist (the items)
  c.channels = 3
  c.train_examples = 0     # > 0: only the first N training items (quick checks)
  c.test_examples = 0      # > 0: only the first N test scenes
  c.seed = 0
  c.batch_size = 128
  c.epochs = 8
  c.max_steps = -1         # > 0 stops early
  c.lr = 1.5e-3
  c.min_lr = 1e-5
  c.warmup_steps = 300
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.label_smoothing = 0.1
  c.flip = True
  c.crop_pad = 0           # positions and scales are already random in every scene
  c.eval_batch_size = 500
  c.eval_every_epoch = True
  c.ckpt_every_steps = 100
  c.output = ""            # empty: WORKDIR/model.safetensors
  c.provisional_path = ""  # also written once test top-1 reaches provisional_top1
  c.provisional_top1 = 80.0
  return c
