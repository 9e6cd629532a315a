"""Stopping on SIGTERM between two steps, with the state saved, instead of mid-step.

The handler only records the signal. The long loops (synthesis, reconstruction,
evaluation) look at it after each step, save what a restart needs, and raise `Stopped`;
`stop_on_sigterm` turns that into one log line and exit status 143 (128 + SIGTERM), the
status a job scheduler expects from a process it terminated. SIGKILL cannot be caught:
a restart then resumes from the last periodic save.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from absl import logging

EXIT_CODE = 128 + signal.SIGTERM

_requested = threading.Event()


class Stopped(Exception):
  """A loop stopped at `step` of `stage` because SIGTERM arrived; its state is saved."""

  def __init__(self, stage: str, step: int):
    self.stage, self.step = stage, step
    super().__init__(f"stopped by SIGTERM at {stage} step {step}; rerun the same command to "
                     "resume")


def requested() -> bool:
  """Whether SIGTERM has arrived: a loop saves and raises `Stopped` after its step."""
  return _requested.is_set()


def _on_sigterm(signum: int, frame) -> None:
  del signum, frame
  _requested.set()
  # os.write, not logging: a handler may run while the logging lock is held.
  os.write(2, b"SIGTERM received: stopping after the current step (state is saved first)\n")


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
  """Within the block SIGTERM asks the loops to stop; a `Stopped` that leaves the block is
  logged and exits with EXIT_CODE."""
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    yield
  except Stopped as e:
    logging.warning("%s", e)
    raise SystemExit(EXIT_CODE) from e
  finally:
    signal.signal(signal.SIGTERM, previous)
    _requested.clear()
