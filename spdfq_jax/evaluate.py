"""Top-1 / top-5 accuracy, sharded over the `data` mesh axis.

Every batch is padded to the fixed batch size (so one compiled program serves all of
them) and the padding is masked out, so each image counts exactly once.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from spdfq_jax import parallel


def _correct_counts(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """(#top1 correct, #top5 correct) over valid rows."""
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit = top5 == labels[:, None]
  return jnp.stack([jnp.sum(hit[:, 0] & valid), jnp.sum(hit.any(-1) & valid)])


def batches_from_arrays(images: np.ndarray, labels: np.ndarray, batch_size: int
                        ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
  for i in range(0, len(images), batch_size):
    yield images[i:i + batch_size], labels[i:i + batch_size]


def evaluate(logits_fn: Callable[[jax.Array], jax.Array],
             batches: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
             total: Optional[int] = None, desc: str = "eval") -> dict:
  """Accuracy (percent) of `logits_fn` over `(images, labels)` batches of at most batch_size."""
  mesh = parallel.data_mesh()
  batch_size += (-batch_size) % mesh.size
  shard = parallel.batch_sharding(mesh)

  @jax.jit
  def step(images, labels, valid):
    return _correct_counts(logits_fn(images), labels, valid)

  counts = np.zeros(2, np.int64)
  n = 0
  with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
    for images, labels in batches:
      k = len(images)
      images, _ = parallel.pad_batch(np.asarray(images), batch_size)
      labels, _ = parallel.pad_batch(np.asarray(labels, np.int32), batch_size)
      valid = np.arange(batch_size) < k
      args = jax.device_put((images, labels, valid), shard)
      counts += np.asarray(step(*args))
      n += k
      bar.update(k)
  if n == 0:
    raise ValueError("evaluation got no images")
  return {"top1": 100.0 * counts[0] / n, "top5": 100.0 * counts[1] / n, "count": n}
