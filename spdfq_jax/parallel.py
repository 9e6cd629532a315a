"""Device mesh and shardings: one `data` axis over every device of every process.

In a multi-process (multi-host) run every process runs the same program. A global array
is built from what each process holds: `global_batch` from its own rows of a batch,
`shard_batch` from a value every process holds in full; either way a process transfers
only the rows of its own devices. `to_host` gathers one back, `on_primary` keeps the
writes to the shared workdir on process 0.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
# How a process without a cluster that jax recognises learns its place in the run.
NUM_PROCESSES_ENV, PROCESS_ID_ENV = "SPDFQ_NUM_PROCESSES", "SPDFQ_PROCESS_ID"


def maybe_initialize_distributed() -> None:
  """Joins a multi-process run when SPDFQ_DISTRIBUTED=1.

  On a Cloud TPU pod, under SLURM or Open MPI, jax finds the coordinator and the process
  ids itself. Elsewhere every process sets JAX_COORDINATOR_ADDRESS=host:port (a free port
  on process 0's host), SPDFQ_NUM_PROCESSES and its own SPDFQ_PROCESS_ID (0 on that host).
  """
  if os.environ.get("SPDFQ_DISTRIBUTED", "0") != "1":
    return
  kwargs = {}
  for env, arg in ((NUM_PROCESSES_ENV, "num_processes"), (PROCESS_ID_ENV, "process_id")):
    value = os.environ.get(env)
    if value is not None:
      if not value.isdigit():
        raise ValueError(f"{env}={value!r}: must be a non-negative integer")
      kwargs[arg] = int(value)
  jax.distributed.initialize(**kwargs)


def data_mesh() -> Mesh:
  """1-D mesh over all devices; the batch is split along it. Each process's devices sit
  next to each other, so a process holds one contiguous block of rows of every batch."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA,))


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


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf's leading axis across `data` (sizes must divide the device count).

  Every process passes the same full host value; each places only its own devices' rows.
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if jax.process_count() == 1:  # an explicit transfer: allowed under a transfer guard
      return jax.device_put(x, sharding)
    with jax.transfer_guard_host_to_device("allow"):  # placing these rows is the point here
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map(put, tree)


def process_rows(n: int, process_index: int = 0, process_count: int = 1) -> tuple[int, int]:
  """[start, stop) of one process's contiguous share of n examples; shares differ in size
  by at most one, the larger ones first."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in 0..{process_count - 1}")
  base, extra = divmod(n, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)


def global_batch(tree: Any, mesh: Mesh) -> Any:
  """One batch-sharded global array per leaf, from this process's block of rows (every
  process passes the same number of rows: the batch divided by the process count)."""
  sharding = batch_sharding(mesh)
  def put(x):
    with jax.transfer_guard_host_to_device("allow"):  # placing these rows is the point here
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree_util.tree_map(put, tree)


def to_host(tree: Any) -> Any:
  """numpy values of a pytree; an array spread over several processes is gathered from
  all of them, so in a multi-process run every process must call this together."""
  def get(x):  # explicit reads (jax.device_get): allowed under a transfer guard
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(jax.device_get(x.addressable_data(0)))
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(get, tree)


def _host_local(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.process_count() > 1 and x.is_fully_addressable


def as_global(tree: Any) -> Any:
  """In a multi-process run, every jax.Array that lives on this process alone (each
  process holding the same value, as the reconstruction's params) becomes one replicated
  over all devices: the form Orbax saves and restores. Other leaves are unchanged."""
  sharding = replicated(data_mesh())

  def put(x):
    if not _host_local(x):
      return x
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree_util.tree_map(put, tree)


def as_local(tree: Any, like: Any) -> Any:
  """Undoes `as_global` for the leaves that are host-local in `like`."""
  return jax.tree_util.tree_map(
      lambda x, l: jax.device_put(x.addressable_data(0), l.sharding) if _host_local(l) else x,
      tree, like)


def barrier(name: str) -> None:
  """Holds every process until all have reached the barrier of this name."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def on_primary(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
  """Runs `fn` (a write to the shared workdir) on process 0 only; every process waits at
  a barrier until it is done, so none reads a half-written file or exits early."""
  if jax.process_index() == 0:
    fn(*args, **kwargs)
  barrier(name)
