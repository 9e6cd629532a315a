"""Full-precision training of the Fashion-MNIST test-bed models (the built-in assets).

  python -m spdfq_jax.tools.train_fp --config=configs/fmnist_train.py:vit --workdir=runs/fmnist_vit
  python -m spdfq_jax.tools.train_fp --config=configs/fmnist_train.py:swin --config.epochs=3 --workdir=runs/fmnist_swin

Expected (seed 0): ViT (6 blocks, width 96, patch 4) 88.84% test top-1 after 8 epochs, Swin
(patch 2, window 4, three stages) 88.69% after 3; spdfq_jax/assets/MODEL_CARD.md records
commands, times and sizes. The model lands in WORKDIR/model.safetensors (native format),
or at `config.output`.
"""
import ml_collections

MODELS = {
    "vit": dict(img_size=32, patch_size=4, width=96, depth=6, num_heads=4, mlp_ratio=4.0),
    "swin": dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8),
                 window_size=4, mlp_ratio=4.0),
}


def get_config(arg: str = "vit") -> ml_collections.ConfigDict:
  """`arg` picks the architecture: 'vit' or 'swin'."""
  if arg not in MODELS:
    raise ValueError(f"config arg must be one of {sorted(MODELS)}, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.family = arg
  c.model = dict(MODELS[arg], num_classes=10)
  c.data_dir = ""          # empty: /usr/share/datasets/fashion-mnist (or a prepared TFDS)
  c.channels = 1
  c.train_examples = 0     # > 0: only the first N training images (quick checks)
  c.test_examples = 0      # > 0: only the first N test images
  c.seed = 0
  c.batch_size = 128
  c.epochs = 8
  c.max_steps = -1         # > 0 stops early (smoke tests)
  c.lr = 1.5e-3
  c.min_lr = 1e-5
  c.warmup_steps = 200
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.label_smoothing = 0.0
  c.flip = True            # random horizontal flips
  c.crop_pad = 0           # random crops after padding by this many pixels (0: off; 4 is the usual)
  c.eval_batch_size = 500
  c.eval_every_epoch = True
  c.ckpt_every_steps = 100  # besides every epoch end
  c.output = ""            # empty: WORKDIR/model.safetensors
  c.provisional_path = ""  # also written once test top-1 reaches provisional_top1
  c.provisional_top1 = 80.0
  return c
