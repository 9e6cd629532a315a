"""Saving without half-written files: Orbax checkpoints for the resumable loops, and
write-to-temp-then-rename for every other file a resume reads or a person opens.

A loop owns one directory; it saves its whole state (a pytree of arrays and scalars)
every few steps and, on start, resumes from the newest complete step if there is one.
Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
kill during a save leaves the previous step as the newest one; the leftover temporary
directory is removed when the next manager opens the directory.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional
import uuid

from absl import logging
import orbax.checkpoint as ocp

from spdfq_jax import parallel


def manager(directory: str, max_to_keep: int = 1) -> ocp.CheckpointManager:
  """A checkpoint manager for one loop's directory (created if missing; temporary
  directories of saves that were killed are removed)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves `state` at `step` and waits, so a kill right after loses nothing saved. In a
  multi-process run every process calls this with the same (global or host-local) state."""
  mgr.save(step, args=ocp.args.StandardSave(parallel.as_global(state)))
  mgr.wait_until_finished()
  logging.info("checkpoint saved: %s step %d", mgr.directory, step)


def restore_latest(mgr: ocp.CheckpointManager, like: Any) -> Optional[tuple[int, Any]]:
  """(step, state) of the newest checkpoint, shaped like `like`; None when there is none."""
  step = mgr.latest_step()
  if step is None:
    return None
  state = mgr.restore(step, args=ocp.args.StandardRestore(parallel.as_global(like)))
  logging.info("resumed from checkpoint %s step %d", mgr.directory, step)
  return step, parallel.as_local(state, like)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary name beside `path` to write the file to; when the block ends
  without an error the file is flushed to disk and renamed over `path`. A reader, or a
  run killed at any moment, sees the old file or the new one, never part of one.

  The temporary name keeps the extension (writers such as np.savez and PIL go by it) and
  is unique, so processes that write the same file at once do not mix their bytes.
  """
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory,
                     f".{name}.{uuid.uuid4().hex[:8]}.tmp{os.path.splitext(name)[1]}")
  try:
    yield tmp
    _fsync(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync(directory)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (`atomic_path`)."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
