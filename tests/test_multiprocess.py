"""A real two-process run (2 CPU devices each, jax.distributed over localhost) against one
process on 4 devices: the same synthetic images and the same report, with every file
written by process 0 alone."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from spdfq_jax import evaluate, main, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "multiprocess_child.py")
TIMEOUT_S = 900  # a hang (a process stuck in a collective) fails; a busy machine does not
# What may differ between two runs of the same config: where, when and on what they ran.
VOLATILE = ("timings", "row_dir", "synth_dir", "export", "workdir", "date", "total_seconds",
            "load_seconds", "fp_eval_seconds", "machine", "command")
SYNTH_TERMS = ("class_fit", "region_class_fit", "prior_fit", "prior_fit_chance")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(logs, name: str, workdir, devices: int, process: int = 0, processes: int = 1,
           port: int = 0) -> tuple[subprocess.Popen, str]:
  """Starts one pipeline process; its stdout and stderr go to files (a pipe nobody reads
  yet would fill up and stall it, and with it every process waiting in a collective)."""
  # Compiling dominates these tiny runs: XLA's cheapest CPU back end, the same on both sides.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  if processes > 1:
    env.update({"SPDFQ_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                parallel.NUM_PROCESSES_ENV: str(processes),
                parallel.PROCESS_ID_ENV: str(process)})
  log = os.path.join(logs, name.replace(" ", "_"))
  with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
    return subprocess.Popen([sys.executable, CHILD, str(workdir)], env=env, stdout=out,
                            stderr=err), log


def _finish(procs: dict) -> list[dict]:
  """Waits for every process. Once one fails, or at the timeout, stops the others (they
  would wait for it in a collective) and fails with the stderr of each."""
  deadline = time.monotonic() + TIMEOUT_S
  while (any(p.poll() is None for p, _ in procs.values()) and time.monotonic() < deadline
         and not any(p.returncode for p, _ in procs.values())):
    time.sleep(0.5)
  for p, _ in procs.values():
    if p.poll() is None:
      p.kill()
      p.wait()
  if any(p.returncode != 0 for p, _ in procs.values()):
    tails = []
    for name, (p, log) in procs.items():
      with open(log + ".err") as f:
        tails.append(f"--- {name} (exit {p.returncode}) stderr:\n{f.read()[-6000:]}")
    pytest.fail(f"a pipeline process failed, or the run took over {TIMEOUT_S} s:\n"
                + "\n".join(tails))
  outs = []
  for _, log in procs.values():
    with open(log + ".out") as f:
      outs.append(json.loads(f.read().strip().splitlines()[-1]))
  return outs


def _stable(report: dict) -> dict:
  strip = lambda d: {k: v for k, v in d.items() if k not in VOLATILE + SYNTH_TERMS}
  return dict(strip(report), rows=[strip(r) for r in report["rows"]])


def _read(workdir) -> tuple[dict, np.ndarray]:
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  row = next(r for r in report["rows"] if r["method"] == "inversion")
  return report, np.load(os.path.join(row["synth_dir"], main.SET_FILE))["images"]


def _orbax_internal(path: str) -> bool:
  """Files Orbax itself writes from every process of a multi-process save."""
  return ".orbax-checkpoint-tmp" in path


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  port = _free_port()
  # One after the other: gloo gives up on a collective that one process reaches 30 s after
  # the other, so the pair should not share the cores with a third process.
  multi = _finish({f"process {i} of 2": _start(tmp_path, f"process {i} of 2",
                                               tmp_path / "multi", 2, i, 2, port)
                   for i in range(2)})
  multi += _finish({"the single process": _start(tmp_path, "single", tmp_path / "single", 4)})
  assert [(m["process"], m["processes"], m["devices"]) for m in multi] == [
      (0, 2, 4), (1, 2, 4), (0, 1, 4)]
  # Only process 0 writes the workdir's files (reports, sets, PNGs, exports, moves);
  # process 1 writes only its writability probe and its part of the Orbax checkpoints.
  others = [w for w in multi[1]["writes"]
            if not os.path.basename(w).startswith(".write-test-") and not _orbax_internal(w)]
  assert others == [] and multi[1]["exports"] == [], (others, multi[1]["exports"])
  assert len(multi[0]["exports"]) == 2
  # (atomic writes: a temporary name beside the file, then a rename)
  assert any(os.path.basename(w).startswith(".report.json.") for w in multi[0]["writes"])

  report_2x2, images_2x2 = _read(tmp_path / "multi")
  report_1x4, images_1x4 = _read(tmp_path / "single")
  assert report_2x2["machine"]["process_count"] == 2
  # To float tolerance, not bytes: the batch-coupled loss terms (the batch TV) are summed
  # over the devices by an all-reduce, which across processes (gloo) adds in another order
  # than within one process; about half the pixels differ, by at most 4e-7 here.
  np.testing.assert_allclose(images_2x2, images_1x4, rtol=0, atol=1e-5)
  assert _stable(report_2x2) == _stable(report_1x4)
  for a, b in zip(report_2x2["rows"], report_1x4["rows"]):
    for k in SYNTH_TERMS:
      assert a.get(k) == pytest.approx(b.get(k), abs=1e-4), k
  assert report_1x4["eval_count"] == report_1x4["fp_eval_count"] == 61
  # Orbax: every process saves and restores the same state, each gets it back whole.
  for m in multi:
    assert m["round_trip"] == {
        "step": 1, "values": {"global": [3.0 * i for i in range(8)], "local": [0.5, 1.5, 2.5],
                              "step": 7},
        "global_sharding": ["data"], "local_on_this_process": True}


def test_process_shares_cover_the_set_once():
  for n, count in ((61, 2), (7, 3), (5, 5), (0, 2)):
    shares = [parallel.process_rows(n, i, count) for i in range(count)]
    expected = np.array_split(np.arange(n), count)
    assert [list(range(*s)) for s in shares] == [e.tolist() for e in expected]
  x, y = np.arange(61)[:, None], np.arange(61)
  got = [b for i in range(2) for b in evaluate.batches_from_arrays(x, y, 8, i, 2)]
  assert [len(b[1]) for b in got] == [8, 8, 8, 7, 8, 8, 8, 6]
  np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), y)


def test_a_process_given_the_wrong_share_is_told():
  x, y = np.zeros((10, 3), np.float32), np.zeros(10, np.int32)
  with pytest.raises(ValueError, match="share of the 6 is 6"):
    evaluate.evaluate(lambda v: v, evaluate.batches_from_arrays(x, y, 4), 4, total=6)
