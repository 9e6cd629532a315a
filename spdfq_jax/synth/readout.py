"""When a synthesis loop reads the device, and what it checks there."""
from __future__ import annotations

import math

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
