"""The pipeline killed anywhere and restarted with the same command ends with the report and
the synthetic images of a run that was never interrupted, and every restart resumes.

One chain per signal: a run is killed at a point of synthesis, restarted, killed at the
next point (early and late in synthesis and evaluation, once in each reconstruction
stage), and so on until a restart completes. A third chain kills inside an Orbax checkpoint save and inside
the atomic write of the finished synthesis set; the chains run side by side. The child
(kill_child.py) pauses at the named point, so each kill lands exactly there and the step a
restart must resume from is known in advance.
"""
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import main_child  # noqa: E402  pylint: disable=wrong-import-position

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_child.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (stage, point, step resumed from after SIGKILL, after SIGTERM). Synthesis checkpoints
# every 3 steps and on SIGTERM after the current step; each reconstruction stage (FP weights,
# then quantized weights) after each of its 4 units (SIGTERM redoes the unit it was in);
# evaluation saves its counts every 2 batches and on SIGTERM after the current batch.
POINTS = (
    ("synthesis", "synth 4", 3, 4),
    ("synthesis", "synth 11", 9, 11),
    ("reconstruction_acts", "recon_acts blocks.0 2", 1, 1),
    ("reconstruction", "recon head 3", 3, 3),
    ("evaluation", "eval 3", 2, 3),
    ("evaluation", "eval 6", 4, 6),
)
# What a restart logs when it resumes each stage; group 1 is the step.
RESUMED = {
    "synthesis": r"resumed from checkpoint \S+/synthetic/checkpoints step (\d+)",
    "reconstruction_acts": r"resumed from checkpoint \S+/quant/recon_acts step (\d+)",
    "reconstruction": r"resumed from checkpoint \S+/quant/recon step (\d+)",
    "evaluation": r"eval inversion W4A4: resumed from \S+ after (\d+) batches",
}
TIMEOUT = 900  # seconds for one run of the child (a watchdog: a healthy run takes ~15 s)


def _env(cache: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  return env


def _run(workdir: str, env: dict, pause: str = None, sig: int = None) -> tuple[int, str]:
  """(exit status, output) of one child run; with `pause`, sent `sig` when it pauses there."""
  proc = subprocess.Popen([sys.executable, CHILD, workdir] + ([pause] if pause else []),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  timed_out = threading.Event()
  watchdog = threading.Timer(TIMEOUT, lambda: (timed_out.set(), proc.kill()))
  watchdog.start()
  lines, signalled = [], False
  try:
    for line in proc.stdout:
      lines.append(line)
      if pause and not signalled and line.strip() == f"PAUSE {pause}":
        proc.send_signal(sig)
        signalled = True
    proc.wait()
  finally:
    watchdog.cancel()
    if proc.poll() is None:
      proc.kill()
  out = "".join(lines)
  assert not timed_out.is_set(), f"the run took over {TIMEOUT} s:\n{out[-3000:]}"
  assert not pause or signalled, f"the run never reached {pause!r}:\n{out[-3000:]}"
  return proc.returncode, out


def _markers(out: str, prefix: str) -> list[str]:
  return [l[len("MARK "):].strip() for l in out.splitlines()
          if l.startswith("MARK " + prefix)]


def _resumed_step(stage: str, out: str) -> int:
  """The step the restart's log says it resumed `stage` from, checking that the stages
  before it were not run again."""
  found = re.findall(RESUMED[stage], out)
  assert len(found) == 1, f"no single resume line for {stage}:\n{out[-4000:]}"
  step = int(found[0])
  synth_steps = [int(m.split()[1]) for m in _markers(out, "synth ")]
  if stage == "synthesis":
    assert synth_steps and synth_steps[0] == step + 1, synth_steps  # went on, not from 1
  else:
    assert not synth_steps and "MARK save result.npz" not in out  # the set was reused
  if stage == "reconstruction":
    assert not _markers(out, "recon_acts "), "the first reconstruction stage ran again"
  if stage == "evaluation":
    assert not _markers(out, "recon"), "reconstruction ran again"
  return step


def _outputs(workdir: str) -> tuple[dict, dict[str, bytes]]:
  """(stable part of report.json, bytes of the synthetic set's files)."""
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  synth_dir = report["synth_dir"]
  files = {name: open(os.path.join(synth_dir, name), "rb").read()
           for name in ("grid.png", "attention.png", "diagnostics.json")}
  with np.load(os.path.join(synth_dir, "result.npz")) as z:
    files.update({f"result.npz:{k}": z[k].tobytes() for k in z.files})
  return main_child.stable(report), files


@pytest.fixture
def cache(tmp_path):
  return str(tmp_path / "jax_cache")


@pytest.fixture
def reference(tmp_path, cache):
  """The uninterrupted run's report and synthetic set (its compiled programs are cached
  for the runs that follow)."""
  workdir = str(tmp_path / "reference")
  rc, out = _run(workdir, _env(cache))
  assert rc == 0, out[-4000:]
  return _outputs(workdir)


def _assert_same_as_reference(workdir: str, reference) -> None:
  report, files = _outputs(workdir)
  ref_report, ref_files = reference
  assert report == ref_report
  assert files.keys() == ref_files.keys()
  for name, data in files.items():
    assert data == ref_files[name], f"{name} differs from the uninterrupted run's"


def _signal_chain(workdir: str, env: dict, sig: int) -> list[str]:
  """Kills a run at POINTS[0] with `sig`, restarts it until POINTS[1], ... until a restart
  completes; checks each restart's resume step. Returns the matrix rows."""
  name = signal.Signals(sig).name
  rc, out = _run(workdir, env, POINTS[0][1], sig)
  table = []
  for i, (stage, point, after_kill, after_term) in enumerate(POINTS):
    if sig == signal.SIGTERM:
      assert rc == 143, out[-4000:]
      assert re.search(r"stopped by SIGTERM at .+ step \d+; rerun the same command to resume",
                       out), out[-4000:]
    else:
      assert rc == -signal.SIGKILL, out[-4000:]
    following = POINTS[i + 1][1] if i + 1 < len(POINTS) else None
    rc, out = _run(workdir, env, following, sig if following else None)
    step = _resumed_step(stage, out)
    table.append(f"| {name} | {stage} | {point} | step {step} |")
    assert step == (after_term if sig == signal.SIGTERM else after_kill), table[-1]
  assert rc == 0, out[-4000:]
  return table


def _save_chain(workdir: str, env: dict) -> list[str]:
  """Kills a run inside the Orbax save of synthesis step 6, restarts it and kills it inside
  the atomic write of result.npz, restarts it to the end."""
  rc, out = _run(workdir, env, "save synth 6 default", signal.SIGKILL)
  assert rc == -signal.SIGKILL
  ckpts = next(os.path.join(r, "checkpoints")
               for r, dirs, _ in os.walk(os.path.join(workdir, "synthetic"))
               if "checkpoints" in dirs)
  assert sorted(os.listdir(ckpts)) == ["3", "6.orbax-checkpoint-tmp"]  # killed mid-save

  rc, out = _run(workdir, env, "save result.npz", signal.SIGKILL)
  first = _resumed_step("synthesis", out)
  assert first == 3  # not the half-saved step 6
  assert "6.orbax-checkpoint-tmp" not in os.listdir(ckpts)  # removed when reopened
  synth_dir = os.path.dirname(ckpts)
  assert "result.npz" not in os.listdir(synth_dir)
  assert any(n.startswith(".result.npz.") for n in os.listdir(synth_dir))  # killed mid-write

  rc, out = _run(workdir, env)
  assert rc == 0, out[-4000:]
  second = _resumed_step("synthesis", out)
  assert second == 9  # the unfinished set was not taken as finished
  return [f"| SIGKILL | synthesis | inside the Orbax save of step 6 | step {first} |",
          f"| SIGKILL | synthesis | inside the write of result.npz | step {second} |"]


@pytest.mark.slow
def test_killed_anywhere_and_restarted_gives_the_uninterrupted_report(tmp_path, reference, cache):
  """The three chains run side by side (each in its own workdir)."""
  env = _env(cache)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    chains = {name: pool.submit(fn, str(tmp_path / name), env, *args)
              for name, fn, args in (("sigkill", _signal_chain, (signal.SIGKILL,)),
                                     ("sigterm", _signal_chain, (signal.SIGTERM,)),
                                     ("saves", _save_chain, ()))}
    tables = {name: chain.result() for name, chain in chains.items()}
  print("\n| signal | stage | point | resumed from |\n|---|---|---|---|")
  print("\n".join(row for rows in tables.values() for row in rows))
  for name in chains:
    _assert_same_as_reference(str(tmp_path / name), reference)
