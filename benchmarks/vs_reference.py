"""One PSAQ-ViT synthesis iteration, timed here and in the reference's own PyTorch loop.

  python benchmarks/vs_reference.py --reference /path/to/PSAQ-ViT [--iters 3] [--batch 32]

Both sides run in this process, one after the other, on the same timm
`deit_tiny_patch16_224` with random weights (the JAX model gets the same weights through
`models.convert`; their logits are compared first). The reference is zkkli/PSAQ-ViT's
`generate_data.py`, imported from the checkout and run unmodified on the CPU with the
patches of tests/fixtures/make_psaq_reference.py (its `tqdm` is swapped for one that runs
the first iterations of round 1 and times each). Here it is `synth.generate` with the
`psaq` method, timed as whole runs of 1 and 1 + --iters steps (the difference over
--iters, three such pairs), before and after the reference (the machine's load may drift
while the slow side runs); a first run compiles and is left out. The reference's first
iteration is left out too; the script prints the medians and their ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any, Iterator
from unittest import mock

import jax
import numpy as np
import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
from make_psaq_reference import import_reference, on_cpu  # noqa: E402  pylint: disable=g-import-not-at-top

from spdfq_jax import synth  # noqa: E402  pylint: disable=g-import-not-at-top
from spdfq_jax.models import convert, zoo  # noqa: E402  pylint: disable=g-import-not-at-top

MODEL = "deit_tiny_patch16_224"
ROUTE = "deit_tiny"  # the reference's name for it


def timed_tqdm(n: int, ticks: list[float]) -> type:
  """A `tqdm` that yields the first `n` iterations of the reference's first round (none of
  the second), recording the time as each starts and as the last ends."""

  class Timed:
    def __init__(self, iterable: Any) -> None:
      self.items = list(iterable)[:n] if not ticks else []

    def __enter__(self) -> "Timed":
      return self

    def __exit__(self, *exc: Any) -> None:
      return None

    def __iter__(self) -> Iterator[int]:
      for itr in self.items:
        ticks.append(time.perf_counter())
        yield itr
      if self.items:
        ticks.append(time.perf_counter())

    def set_description(self, desc: str) -> None:
      pass

  return Timed


def time_reference(gd: Any, model: torch.nn.Module, batch: int, iters: int) -> list[float]:
  """Seconds of each of the reference loop's first `iters` iterations."""
  ticks: list[float] = []
  with contextlib.ExitStack() as stack:
    on_cpu(stack, gd, model, ROUTE)
    stack.enter_context(mock.patch.object(gd, "tqdm", timed_tqdm(iters, ticks)))
    gd.generate_data(SimpleNamespace(model=ROUTE, calib_batchsize=batch))
  return list(np.diff(ticks))


def run_seconds(module: Any, params: Any, batch: int, iters: int) -> float:
  """Wall seconds of one whole synth.generate (psaq) run of `iters` steps, images on the
  host at the end (the loop reads the device only every few steps, so a per-step
  callback would time the dispatch, not the steps)."""
  cfg = synth.default_config("psaq", "vit")
  cfg.update(num_images=batch, iterations=iters, rounds=1, warmup=1)
  start = time.perf_counter()
  res = synth.generate(module, params, cfg, progress=False)
  np.asarray(jax.block_until_ready(res.images))
  return time.perf_counter() - start


def time_here(module: Any, params: Any, batch: int, iters: int) -> list[float]:
  """Seconds per step, from whole runs of 1 and 1 + `iters` steps (the difference over
  `iters`), three times; a first 1-step run compiles and is left out."""
  run_seconds(module, params, batch, 1)
  out = []
  for _ in range(3):
    short = run_seconds(module, params, batch, 1)
    long = run_seconds(module, params, batch, 1 + iters)
    out.append((long - short) / iters)
  return out


def _list(seconds: list[float]) -> str:
  return ", ".join(f"{t:.2f}" for t in seconds)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reference", required=True, help="a PSAQ-ViT checkout (never copied)")
  ap.add_argument("--iters", type=int, default=3, help="timed iterations per run, after one "
                  "untimed first iteration")
  ap.add_argument("--batch", type=int, default=32, help="images per iteration (the paper: 32)")
  ap.add_argument("--seed", type=int, default=0)
  opts = ap.parse_args()
  if opts.iters < 1 or opts.batch < 1:
    sys.exit("--iters and --batch must be >= 1")
  gd = import_reference(opts.reference)
  torch.manual_seed(opts.seed)
  model = timm.create_model(MODEL, pretrained=False).eval()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  module, params = convert.load_state_dict(zoo.build(MODEL), sd)
  probe = np.random.default_rng(opts.seed).normal(size=(2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(probe).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(jax.jit(module.apply)({"params": params}, probe))
  err = float(np.abs(got - want).max() / np.abs(want).max())
  print(f"{MODEL}, random weights: logits here vs timm, max rel. error {err:.1e}")
  if err > 1e-4:
    sys.exit("the JAX model does not compute what the timm model does")

  print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), timm {timm.__version__}, jax {jax.__version__} "
        f"on {jax.devices()[0].platform}; batch {opts.batch}, {opts.iters} timed iterations "
        f"each after one untimed; load average {os.getloadavg()[0]:.1f}", flush=True)
  before = time_here(module, params, opts.batch, opts.iters)
  print(f"here:      s/iteration from run-length differences: {_list(before)}", flush=True)
  ref = time_reference(gd, model, opts.batch, opts.iters + 1)
  print(f"reference: first {ref[0]:.2f} s, then {_list(ref[1:])}", flush=True)
  after = time_here(module, params, opts.batch, opts.iters)
  print(f"here:      s/iteration from run-length differences: {_list(after)}")
  here = before + after
  m_here, m_ref = statistics.median(here), statistics.median(ref[1:])
  print(f"\nmedian s/iteration: reference {m_ref:.2f}, here {m_here:.2f}; "
        f"reference / here = {m_ref / m_here:.1f}x (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  main()
