"""When a synthesis loop reads the device, what it checks there, and how it reports."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np


def finite_or_raise(start: int, terms: dict[str, np.ndarray]) -> None:
  """Raises at the first step of a fetched block (rows from step `start`) with a
  non-finite term, naming the step and the terms."""
  bad = ~np.isfinite(np.stack(list(terms.values()), -1)).all(-1)
  if bad.any():
    i = int(np.argmax(bad))
    row = {k: float(v[i]) for k, v in terms.items()}
    detail = ", ".join(f"{k}={v}" for k, v in row.items() if not math.isfinite(v))
    raise FloatingPointError(f"synthesis loss is not finite at step {start + i}: {detail} "
                             f"(all terms: {row})")


def fetch_points(start: int, total: int, every: int, checkpoint_every: int
                 ) -> list[tuple[int, int]]:
  """Blocks [first, end) of steps run without looking at the device: they end at every
  multiple of `every` (the log buffer's length) and of `checkpoint_every`, and at `total`."""
  ends = sorted({e for e in range(start + 1, total + 1)
                 if e % every == 0 or e % checkpoint_every == 0 or e == total})
  return list(zip([start] + ends[:-1], ends))


def report_block(first: int, end: int, values: dict[str, np.ndarray], bar: Any,
                 callback: Optional[Callable[[int, dict[str, float]], None]]) -> None:
  """Shows the last of a block's values (rows = steps first..end - 1) on the progress bar
  and hands each step's values to `callback`, in order."""
  if bar is not None:
    bar.set_postfix({k: f"{v[-1]:.4g}" for k, v in values.items()}, refresh=False)
    bar.update(end - first)
  if callback is not None:
    for i in range(end - first):
      callback(first + i, {k: float(v[i]) for k, v in values.items()})
