"""Top-1 / top-5 accuracy, sharded over the `data` mesh axis.

Every batch is padded to the fixed batch size (so one compiled program serves all of
them) and the padding is masked out, so each image counts exactly once.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from spdfq_jax import interrupt, parallel, report

SAVE_EVERY = 50  # batches between saves of the counts so far (a kill redoes at most these)


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
             total: Optional[int] = None, desc: str = "eval",
             progress_path: Optional[str] = None) -> dict:
  """Accuracy (percent) of `logits_fn` over `(images, labels)` batches of at most batch_size.

  With `progress_path`, the counts so far are saved there every SAVE_EVERY batches and on
  SIGTERM (then `interrupt.Stopped` is raised), and a saved file is resumed from: its
  batches are skipped (read, not evaluated). The counts are integers, so a resumed
  evaluation gives exactly the numbers of an unbroken one.
  """
  mesh = parallel.data_mesh()
  batch_size += (-batch_size) % mesh.size
  shard = parallel.batch_sharding(mesh)

  @jax.jit
  def step(images, labels, valid):
    return _correct_counts(logits_fn(images), labels, valid)

  done, counts, n = 0, np.zeros(2, np.int64), 0
  saved = report.read_json(progress_path) if progress_path else None
  if saved is not None:
    done, counts, n = saved["batches"], np.asarray(saved["counts"], np.int64), saved["count"]
    logging.info("%s: resumed from %s after %d batches (%d images)", desc, progress_path,
                 done, n)
  with tqdm(total=total, initial=n, desc=desc, unit="img", leave=False) as bar:
    for b, (images, labels) in enumerate(itertools.islice(batches, done, None), done + 1):
      k = len(images)
      images, _ = parallel.pad_batch(np.asarray(images), batch_size)
      labels, _ = parallel.pad_batch(np.asarray(labels, np.int32), batch_size)
      valid = np.arange(batch_size) < k
      args = jax.device_put((images, labels, valid), shard)
      counts += np.asarray(step(*args))
      n += k
      bar.update(k)
      stop = interrupt.requested()
      if progress_path and (b % SAVE_EVERY == 0 or stop) and jax.process_index() == 0:
        report.write_json(progress_path, {"batches": b, "counts": counts.tolist(), "count": n})
        logging.info("%s: progress saved after %d batches", desc, b)
      if stop:
        raise interrupt.Stopped(desc, b)
  if n == 0:
    raise ValueError("evaluation got no images")
  return {"top1": 100.0 * counts[0] / n, "top5": 100.0 * counts[1] / n, "count": n}
