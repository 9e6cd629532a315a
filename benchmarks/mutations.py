"""Mutation pass: does the test suite notice a one-line change to the package?

Reads a JSON list of mutations ({name, file, old, new, tests}; default
benchmarks/mutations.json beside this script). For each one it replaces the exact string
`old` (which must occur once) by `new` in the package file, runs pytest on the listed tests
(`-x -q -p no:cacheprovider`), restores the file, and records whether a test failed
(KILLED, with the failing test) or not (SURVIVED), and the seconds it took. Prints the
table as it goes and writes it as JSON and markdown (mutations.out.json, mutations.out.md)
into --out=DIR (default: the system's temporary directory, so the repository stays clean).

While a mutation runs, the package file is edited IN PLACE; it is restored after the run,
also on Ctrl-C, SIGTERM or an error. Nothing else (an editor, another test run) may read or
edit the package meanwhile, and only one instance may run at a time.

  nice -n 5 .venv/bin/python benchmarks/mutations.py [mutations.json] [--out=DIR] [name ...]

Names, when given, select the mutations to run (default: all). Exit status 1 when a
mutation survives.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 1200


class _Restore:
  """Keeps the original text of the file being mutated; puts it back on exit or signal."""

  def __init__(self):
    self.path, self.text = None, None

  def set(self, path: str, text: str) -> None:
    self.path, self.text = path, text

  def restore(self, *_) -> None:
    if self.path is not None:
      with open(self.path, "w") as f:
        f.write(self.text)
      self.path, self.text = None, None


def run_one(m: dict, keeper: _Restore) -> tuple[str, float, int]:
  """(result, seconds, line of the change) of one mutation."""
  path = os.path.join(ROOT, m["file"])
  with open(path) as f:
    src = f.read()
  count = src.count(m["old"])
  if count != 1:
    raise ValueError(f"{m['name']}: {m['file']} holds the old text {count} times, not once")
  line = src[:src.index(m["old"])].count("\n") + 1
  keeper.set(path, src)
  t = time.time()
  try:
    with open(path, "w") as f:
      f.write(src.replace(m["old"], m["new"]))
    try:
      r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          *m["tests"]], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      return f"KILLED (timeout {TIMEOUT_S} s)", time.time() - t, line
  finally:
    keeper.restore()
  failed = [l.split()[1] for l in r.stdout.splitlines() if l.startswith(("FAILED", "ERROR"))]
  if r.returncode == 0:
    return "SURVIVED", time.time() - t, line
  if r.returncode == 5:  # no tests collected: a wrong test id, not a kill
    return "NO TESTS RAN", time.time() - t, line
  return "KILLED " + (",".join(failed) or f"(pytest exit {r.returncode})"), time.time() - t, line


def main(argv: list[str]) -> int:
  spec_path = argv[1] if len(argv) > 1 and argv[1].endswith(".json") else os.path.join(
      ROOT, "benchmarks", "mutations.json")
  out_dir = tempfile.gettempdir()
  for a in argv[1:]:
    if a.startswith("--out="):
      out_dir = a[len("--out="):]
  names = [a for a in argv[1:] if not a.endswith(".json") and not a.startswith("--")]
  with open(spec_path) as f:
    spec = json.load(f)
  if names:
    spec = [m for m in spec if m["name"] in names]
  keeper = _Restore()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *a: (keeper.restore(), sys.exit(130)))
  out = []
  t0 = time.time()
  for m in spec:
    result, seconds, line = run_one(m, keeper)
    out.append({"name": m["name"], "file": f"{m['file']}:{line}", "old": m["old"],
                "new": m["new"], "result": result, "seconds": round(seconds)})
    print(f"{m['name']:40s} {m['file']}:{line}  {result}  {seconds:.0f} s", flush=True)
  total = round(time.time() - t0)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "mutations.out.json"), "w") as f:
    json.dump({"total_seconds": total, "mutations": out}, f, indent=1)
  lines = ["| mutation | file:line | change | result | s |", "|---|---|---|---|---|"]
  for o in out:
    change = f"`{o['old'].strip()}` -> `{o['new'].strip()}`".replace("|", "\\|")
    lines.append(f"| {o['name']} | {o['file']} | {change} | {o['result']} | {o['seconds']} |")
  lines.append(f"\ntotal {total} s, {sum(o['result'] == 'SURVIVED' for o in out)} survived "
               f"of {len(out)}")
  with open(os.path.join(out_dir, "mutations.out.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print(lines[-1].strip(), "; table in", os.path.join(out_dir, "mutations.out.md"))
  return int(any(not o["result"].startswith("KILLED") for o in out))


if __name__ == "__main__":
  sys.exit(main(sys.argv))
