"""Device mesh and shardings: one `data` axis over every device of every host."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed() -> None:
  """Joins a multi-host run when the launcher says there is one (TPU pod, SLURM, env vars)."""
  if os.environ.get("SPDFQ_DISTRIBUTED", "0") == "1":
    jax.distributed.initialize()


def data_mesh() -> Mesh:
  """1-D mesh over all devices; the batch is split along it."""
  return Mesh(np.asarray(jax.devices()), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, everything else whole."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
  """Pads the leading axis up to a multiple (repeating the last row); returns (padded, n_valid).

  Padding instead of dropping keeps every image: callers slice `[:n_valid]` or mask.
  """
  n = x.shape[0]
  pad = (-n) % multiple
  if pad == 0:
    return x, n
  return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0), n


def shard_batch(tree, mesh: Mesh):
  """Places every leaf's leading axis across `data` (sizes must divide the device count)."""
  return jax.device_put(tree, batch_sharding(mesh))
