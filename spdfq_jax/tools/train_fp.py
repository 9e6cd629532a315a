"""Trains a full-precision ViT/Swin on a built-in test bed: Fashion-MNIST (32x32, grey)
or Fashion-MNIST scenes (48x48 RGB, `config.dataset='scenes'`, fresh scenes every epoch).

  python -m spdfq_jax.tools.train_fp --config=configs/fmnist_train.py:vit --workdir=DIR
  python -m spdfq_jax.tools.train_fp --config=configs/scenes_train.py:vit --workdir=DIR

AdamW with linear warm-up and cosine decay, random flips and pad-and-crop, batch split
over the `data` mesh axis. The state is saved with Orbax every `ckpt_every_steps` and at
every epoch end, and a restart resumes from it; all randomness comes from `config.seed`
(shuffle order from (seed, epoch), augmentation from (seed, step)), so a resumed run
ends with the same params as an uninterrupted one. The result is written in the native
format with its test accuracy, command, seed and training time in the metadata.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Optional

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from tqdm import tqdm

from spdfq_jax import checkpoint, evaluate, parallel
from spdfq_jax.data import fashion_mnist, scenes
from spdfq_jax.models import native, zoo



def build_model(config: ml_collections.ConfigDict) -> zoo.Model:
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
  return zoo.custom_vit(**kw) if config.family == "vit" else zoo.custom_swin(**kw)


def schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr`, then cosine down to `min_lr` at the last step."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 1))
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, total_steps, config.min_lr)


def optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW; no weight decay on biases, norms, tokens and position embeddings (1-D or tokens)."""
  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and "token" not in str(path[-1]) and "pos_embed" not in str(path[-1]),
        params)
  chain = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  chain.append(optax.adamw(schedule(config, total_steps), b1=0.9, b2=0.999,
                           weight_decay=config.weight_decay, mask=decay_mask))
  return optax.chain(*chain)


def augment(key: jax.Array, images: jax.Array, flip: bool, crop_pad: int, fill: float) -> jax.Array:
  """Random horizontal flip and random `crop_pad`-pixel shift (pad with `fill`, crop back)."""
  b, h, w, _ = images.shape
  k_flip, k_crop = jax.random.split(key)
  if flip:
    do = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    images = jnp.where(do, images[:, :, ::-1], images)
  if crop_pad > 0:
    p = crop_pad
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=fill)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * p + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  return images


class TrainData:
  """The training images of epoch e and the fixed test set of `config.dataset`.

  Fashion-MNIST trains on the same 60k images every epoch; scenes draws new scenes of the
  same 60k items every epoch (seed = epoch + 1; the test scenes use seed 0). Building them
  takes about a minute, in the main thread: a Python thread beside the training loop
  starves it of the GIL.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.scenes = config.get("dataset", "fashion_mnist") == "scenes"
    data_dir = config.data_dir or None
    n_train, n_test = config.get("train_examples", 0), config.get("test_examples", 0)
    if self.scenes:
      items, self.train_y = fashion_mnist.load_raw("train", data_dir)
      self.items = items[:n_train] if n_train > 0 else items
      self.train_y = self.train_y[:len(self.items)]
      idx = np.arange(n_test) if n_test > 0 else None
      test_u8, self.test_y, _ = scenes.load_with_boxes("test", data_dir, indices=idx)
      self.test_x = scenes.normalise(test_u8)
    else:
      self.train_x, self.train_y = fashion_mnist.load("train", data_dir, config.channels)
      self.test_x, self.test_y = fashion_mnist.load("test", data_dir, config.channels)
      if n_train > 0:
        self.train_x, self.train_y = self.train_x[:n_train], self.train_y[:n_train]
      if n_test > 0:
        self.test_x, self.test_y = self.test_x[:n_test], self.test_y[:n_test]

  def __len__(self) -> int:
    return len(self.train_y)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return self.test_x.shape[1:]

  def epoch(self, epoch: int) -> np.ndarray:
    """All training images of `epoch` (a pure function of the epoch)."""
    if not self.scenes:
      return self.train_x
    return scenes.normalise(scenes.make(self.items, epoch + 1, "train")[0])

  def preprocessing(self) -> zoo.Preprocessing:
    return scenes.preprocessing() if self.scenes else fashion_mnist.preprocessing(
        self.config.channels)

  def name(self) -> str:
    return "scenes" if self.scenes else "fashion_mnist"

  def fill(self) -> float:
    """The padding value of random crops: black."""
    return float(scenes.pixel_range()[0].min()) if self.scenes else fashion_mnist.pixel_range()[0]


def make_train_step(module: zoo.Model, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, fill: Optional[float] = None) -> Callable:
  """(state, images, labels, key) -> (state, loss); state = {params, opt_state, step}."""
  fill = fashion_mnist.pixel_range()[0] if fill is None else fill

  def train_step(state, images, labels, key):
    key = jax.random.fold_in(key, state["step"])
    images = augment(key, images, config.flip, config.crop_pad, fill)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, config.model.num_classes),
                                  config.label_smoothing)

    def loss_fn(params):
      logits = module.apply({"params": params}, images)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
            "seconds": state["seconds"]}, loss

  return train_step


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The shuffle order of one epoch, a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def test_accuracy(module: zoo.Model, params: Any, images: np.ndarray, labels: np.ndarray,
                  batch_size: int) -> dict:
  logits_fn = lambda x: module.apply({"params": params}, x)
  return evaluate.evaluate(logits_fn, evaluate.batches_from_arrays(images, labels, batch_size),
                           batch_size, total=len(images), desc="test")


def train(config: ml_collections.ConfigDict, workdir: str,
          command: Optional[str] = None) -> tuple[zoo.Model, Any, dict]:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns (module, params, result)."""
  module = build_model(config)
  data = TrainData(config)
  test_x, test_y = data.test_x, data.test_y
  steps_per_epoch = len(data) // config.batch_size
  total_steps = steps_per_epoch * config.epochs
  last_step = total_steps if config.max_steps <= 0 else min(total_steps, config.max_steps)

  root = jax.random.PRNGKey(config.seed)
  init_key, aug_key = jax.random.split(root)
  params = module.init(init_key, jnp.zeros((1,) + data.image_shape, jnp.float32))["params"]
  tx = optimizer(config, total_steps)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.asarray(0, jnp.int32),
           "seconds": jnp.asarray(0.0, jnp.float32)}

  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  restored = checkpoint.restore_latest(mgr, state)
  if restored is not None:
    state = restored[1]
    print(f"Resumed from step {int(state['step'])}.", flush=True)

  mesh = parallel.data_mesh()
  shard, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} must divide over {mesh.size} devices")
  state = jax.device_put(state, repl)
  step_fn = jax.jit(make_train_step(module, tx, config, data.fill()), donate_argnums=0)

  result: dict = {}
  output = config.output or os.path.join(workdir, "model.safetensors")
  provisional_done = False
  step = int(state["step"])
  t0, seconds0 = time.time(), float(state["seconds"])
  bar = tqdm(total=last_step, initial=step, desc="train", unit="step", dynamic_ncols=True)
  order, order_epoch = None, -1
  while step < last_step:
    epoch, i = divmod(step, steps_per_epoch)
    if epoch != order_epoch:
      order, order_epoch = epoch_order(config.seed, epoch, len(data)), epoch
      train_x = data.epoch(epoch)
    idx = np.sort(order[i * config.batch_size:(i + 1) * config.batch_size])
    batch = jax.device_put((train_x[idx], data.train_y[idx]), shard)
    state, loss = step_fn(state, *batch, aug_key)
    step += 1
    bar.update(1)
    if step % 10 == 0 or step == last_step:
      bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}")
    epoch_end = step % steps_per_epoch == 0
    if epoch_end or step % config.ckpt_every_steps == 0 or step == last_step:
      state["seconds"] = jnp.asarray(seconds0 + time.time() - t0, jnp.float32)
      checkpoint.save(mgr, step, state)
    if epoch_end and config.eval_every_epoch:
      result = test_accuracy(module, state["params"], test_x, test_y, config.eval_batch_size)
      result.update(epoch=step // steps_per_epoch, step=step)
      bar.write(f"epoch {result['epoch']} step {step}: test top-1 {result['top1']:.2f}% "
                f"top-5 {result['top5']:.2f}% ({seconds0 + time.time() - t0:.0f} s)")
      with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
        f.write(json.dumps({k: float(v) for k, v in result.items()}) + "\n")
      if (config.provisional_path and not provisional_done
          and result["top1"] >= config.provisional_top1):
        _write(config.provisional_path, module, state, result, config, command, data)
        provisional_done = True
  bar.close()
  if result.get("step") != step:
    result = test_accuracy(module, state["params"], test_x, test_y, config.eval_batch_size)
    result.update(epoch=step / steps_per_epoch, step=step)
  _write(output, module, state, result, config, command, data)
  print(f"Wrote {output}: test top-1 {result['top1']:.2f}% after {step} steps "
        f"({float(state['seconds']):.0f} s of training).", flush=True)
  return module, state["params"], result


def _write(path: str, module: zoo.Model, state: dict, result: dict,
           config: ml_collections.ConfigDict, command: Optional[str], data: TrainData) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  native.save(path, module, state["params"], data.preprocessing(),
              test_top1=float(result["top1"]), test_top5=float(result["top5"]),
              test_count=int(result["count"]), dataset=data.name(),
              train_command=command or "", seed=int(config.seed),
              train_seconds=round(float(state["seconds"]), 1), train_steps=int(state["step"]),
              train_config=config.to_dict())


def main(argv: list[str]) -> None:
  del argv
  parallel.maybe_initialize_distributed()
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  command = "python -m spdfq_jax.tools.train_fp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  train(_CONFIG.value, _WORKDIR.value, command)


if __name__ == "__main__":
  # Defined here, not at import, so that importing this module beside spdfq_jax.main
  # (which owns the same flag names) does not clash.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and the trained model.")
  app.run(main)
