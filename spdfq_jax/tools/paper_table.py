"""The paper's table (models x calibration sources, one per bit setting) over several runs.

  python -m spdfq_jax.tools.paper_table WORKDIR [WORKDIR ...] [-o OUT.md]

A run covers one model, so the paper's several model lines come from several workdirs:
this reads each one's report.json, merges their rows (a cell run in two workdirs shows the
later one's figure) and prints the table that each run writes to its own paper_table.md,
or writes it to OUT.md. Each cell is the run's top-1 with the paper's figure beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from spdfq_jax import checkpoint, report


def load(workdir: str) -> tuple[list[dict[str, Any]], dict[str, float], str]:
  """One workdir's report rows, its models' paper FP figures and what it evaluated on; a
  workdir without a report is a one-line error, not a traceback."""
  path = os.path.join(workdir, "report.json")
  data = report.read_json(path)
  if data is None:
    raise SystemExit(f"error: {path} does not exist; run `python -m spdfq_jax.main "
                     f"--workdir={workdir}` first.")
  return list(data.get("rows", [])), report.paper_fp_of(data), report.dataset_of(data)


def merge(workdirs: Sequence[str]) -> str:
  """paper_table.md's text over every workdir's rows, in the order given."""
  rows: list[dict[str, Any]] = []
  paper_fp: dict[str, float] = {}
  datasets: list[str] = []
  for workdir in workdirs:
    more_rows, more_fp, dataset = load(workdir)
    rows += more_rows
    paper_fp.update(more_fp)
    datasets.append(dataset)
  return report.paper_markdown(rows, paper_fp, " and ".join(dict.fromkeys(datasets)))


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m spdfq_jax.tools.paper_table",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                      help="workdirs of finished runs (each holds report.json)")
  parser.add_argument("-o", "--out", help="write the table here instead of printing it")
  args = parser.parse_args(argv)
  text = merge(args.workdirs)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    checkpoint.write_text(args.out, text)
    print(f"wrote {args.out}")
  else:
    sys.stdout.write(text)


if __name__ == "__main__":
  main()
