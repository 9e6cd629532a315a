"""Top-1 / top-5 accuracy, sharded over the `data` mesh axis and over processes.

Each process reads only its contiguous share of the evaluation set
(`parallel.process_rows`) and feeds it in batches of `process_batch_size`; the global
batch is the processes' blocks side by side. Every batch is padded to that fixed size (so
one compiled program serves all of them, and every process runs the same number of steps)
and the padding is masked out, so each image counts exactly once. The counts stay on the
devices until the end.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
from tqdm import tqdm

from spdfq_jax import interrupt, parallel, report

SAVE_EVERY = 50  # batches between saves of the counts so far (a kill redoes at most these)


def _correct_counts(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """(#top1 correct, #top5 correct) over valid rows."""
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit = top5 == labels[:, None]
  return jnp.stack([jnp.sum(hit[:, 0] & valid), jnp.sum(hit.any(-1) & valid)])


def process_batch_size(batch_size: int, mesh: Optional[Mesh] = None) -> int:
  """Rows one process feeds per step: `batch_size` rounded up to a multiple of the device
  count, split evenly over the processes."""
  mesh = mesh or parallel.data_mesh()
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  if local_devices * jax.process_count() != mesh.size:
    raise ValueError(f"every process must hold as many devices as the others: this one has "
                     f"{local_devices} of {mesh.size} over {jax.process_count()} processes")
  return (batch_size + (-batch_size) % mesh.size) // jax.process_count()


def batches_from_arrays(images: np.ndarray, labels: np.ndarray, batch_size: int,
                        process_index: int = 0, process_count: int = 1
                        ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
  """One process's share of in-memory arrays (`parallel.process_rows`), in batches of
  `batch_size` rows (the last may be short)."""
  start, stop = parallel.process_rows(len(images), process_index, process_count)
  for i in range(start, stop, batch_size):
    j = min(i + batch_size, stop)
    yield images[i:j], labels[i:j]


def evaluate(logits_fn: Callable[[jax.Array], jax.Array],
             batches: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
             total: Optional[int] = None, desc: str = "eval",
             progress_path: Optional[str] = None) -> dict:
  """Accuracy (percent) of `logits_fn` over `total` images.

  `batches` yields `(images, labels)` of this process's share of the `total` images, in
  batches of `process_batch_size(batch_size)` rows (the last may be short). In a
  single-process run `total` may be None: then every batch is evaluated.

  With `progress_path`, the counts so far are saved there every SAVE_EVERY batches and on
  SIGTERM (then `interrupt.Stopped` is raised), and a saved file is resumed from: its
  batches are skipped (read, not evaluated). The counts are integers, so a resumed
  evaluation gives exactly the numbers of an unbroken one.
  """
  mesh = parallel.data_mesh()
  rows = process_batch_size(batch_size, mesh)
  processes, index = jax.process_count(), jax.process_index()
  if total is None and processes > 1:
    raise ValueError("a multi-process evaluation needs `total`, the size of the whole set")
  if total is not None and total < processes:
    raise ValueError(f"{total} evaluation images cannot be split over {processes} processes: "
                     "evaluate at least one image per process (eval.limit)")
  steps, share = None, None
  if total is not None:
    start, stop = parallel.process_rows(total, index, processes)
    share = stop - start
    steps = -(-parallel.process_rows(total, 0, processes)[1] // rows)  # process 0's is largest

  @jax.jit
  def step(counts, images, labels, valid):
    return counts + _correct_counts(logits_fn(images), labels, valid)

  done, init = 0, np.zeros(2, np.int32)
  saved = report.read_json(progress_path) if progress_path else None
  if saved is not None:
    done, init = saved["batches"], np.asarray(saved["counts"], np.int32)
    logging.info("%s: resumed from %s after %d batches (%d images)", desc, progress_path,
                 done, saved["count"])
  counts = jax.device_put(init, parallel.replicated(mesh))
  it = iter(batches)
  last, seen, s = None, 0, 0
  with tqdm(total=share, desc=desc, unit="img", leave=False, disable=index != 0) as bar:
    while steps is None or s < steps:
      batch = next(it, None)
      if batch is None and (steps is None or last is None):
        break
      if batch is None:  # this process's share ran out first: a batch of padding only
        images, labels, k = last[0], last[1], 0
      else:
        images, labels = np.asarray(batch[0]), np.asarray(batch[1], np.int32)
        k = len(images)
        if k > rows:
          raise ValueError(f"a batch of {k} images, more than the {rows} rows each process "
                           "feeds per step (evaluate.process_batch_size)")
        last = images, labels
      seen += k
      s += 1
      bar.update(k)
      if s <= done:  # counted before the restart
        continue
      images, _ = parallel.pad_batch(images, rows)
      labels, _ = parallel.pad_batch(labels, rows)
      valid = np.arange(rows) < k
      previous, counts = counts, step(counts, *parallel.global_batch((images, labels, valid),
                                                                     mesh))
      previous.block_until_ready()  # the host stays at most one batch ahead of the devices
      stop = interrupt.requested()
      if progress_path and (s % SAVE_EVERY == 0 or stop):
        so_far = parallel.to_host(counts)
        if index == 0:
          report.write_json(progress_path, {"batches": s, "counts": so_far.tolist(),
                                            "count": seen})
          logging.info("%s: progress saved after %d batches", desc, s)
      if stop:
        raise interrupt.Stopped(desc, s)
  if share is not None and (seen != share or next(it, None) is not None):
    raise ValueError(f"process {index} was given {'more than ' if seen == share else ''}{seen} "
                     f"evaluation images; its share of the {total} is {share}: give the data "
                     "iterator process_index and process_count")
  if seen == 0:
    raise ValueError("evaluation got no images")
  top1, top5 = parallel.to_host(counts)
  n = seen if total is None else total
  return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "count": n}
