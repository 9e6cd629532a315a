"""Orbax save/restore for the resumable loops (synthesis, reconstruction, training).

A loop owns one directory; it saves its whole state (a pytree of arrays and scalars)
every few steps and, on start, resumes from the newest complete step if there is one.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from spdfq_jax import parallel


def manager(directory: str, max_to_keep: int = 1) -> ocp.CheckpointManager:
  """A checkpoint manager for one loop's directory (created if missing)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves `state` at `step` and waits, so a kill right after loses nothing saved. In a
  multi-process run every process calls this with the same (global or host-local) state."""
  mgr.save(step, args=ocp.args.StandardSave(parallel.as_global(state)))
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, like: Any) -> Optional[tuple[int, Any]]:
  """(step, state) of the newest checkpoint, shaped like `like`; None when there is none."""
  step = mgr.latest_step()
  if step is None:
    return None
  state = mgr.restore(step, args=ocp.args.StandardRestore(parallel.as_global(like)))
  return step, parallel.as_local(state, like)
