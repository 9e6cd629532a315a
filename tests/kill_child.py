"""Child process for the kill-matrix test: the tiny real pipeline (main_child.tiny_pipeline)
under `interrupt.stop_on_sigterm`, as the command line runs it, printing one marker line per
step of synthesis, reconstruction and evaluation.

usage: python kill_child.py WORKDIR [PAUSE]

PAUSE names one point where the child prints `PAUSE <point>` and waits (until SIGTERM
arrives, or 60 s) so that the parent can signal it exactly there:
  'synth N'           after synthesis step N (before that step's checkpoint, if any)
  'recon UNIT N'      before step N (1-based) of UNIT in the reconstruction after weight
                      quantization; 'recon_acts UNIT N' in the one before it (FP weights)
  'eval N'            before the quantized model's evaluation batch N (1-based)
  'save synth N default'  inside the Orbax save of synthesis step N: the arrays are written
                      into N.orbax-checkpoint-tmp/, nothing is renamed yet
  'save result.npz'   inside the atomic write of the finished synthesis set, before the rename
"""
import contextlib
import importlib
import os
import sys
import time

from absl import logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=wrong-import-position
import main_child  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402
from spdfq_jax import checkpoint, evaluate, interrupt, main, synth  # noqa: E402

reconstruct = importlib.import_module("spdfq_jax.quant.reconstruct")  # not quant.reconstruct()
api = importlib.import_module("spdfq_jax.quant.api")

PAUSE = sys.argv[2] if len(sys.argv) > 2 else None
EVAL_SAVE_EVERY = 2


def config():
  """The tiny run: 12 synthesis steps (checkpoints every 3), 4 units x 4 reconstruction steps,
  6 evaluation batches (counts saved every 2)."""
  stages, c = main_child.tiny_pipeline(depth=2)
  c.methods, c.num_images, c.export = "inversion", 4, False
  c.synth.iterations, c.synth.warmup, c.synth.checkpoint_every = 12, 1, 3
  c.synth.log_every = 1  # a marker after every step (the loop reads the device per block)
  c.quant.recon.iters = 4
  c.eval.limit, c.eval.batch_size = 96, 16
  return stages, c


def mark(point: str) -> None:
  print("MARK", point, flush=True)
  if point == PAUSE:
    print("PAUSE", point, flush=True)
    deadline = time.time() + 60
    while time.time() < deadline and not interrupt.requested():
      time.sleep(0.02)


def instrument(stages):
  """Marker hooks around the loops' steps and the two kinds of save."""
  stages.generate = lambda m, p, cfg, workdir=None: synth.generate(
      m, p, cfg, workdir=workdir, progress=False, callback=lambda s, _: mark(f"synth {s + 1}"))

  step, calls, stage = reconstruct._step, {}, ["recon"]  # pylint: disable=protected-access

  def counted_step(qmod, name, *args):
    key = f"{stage[0]} {name}"
    calls[key] = calls.get(key, 0) + 1
    mark(f"{key} {calls[key]}")
    return step(qmod, name, *args)
  reconstruct._step = counted_step  # pylint: disable=protected-access

  run_stage = api.reconstruct

  def named_stage(*args, workdir=None, **kw):  # the stage is named by its directory
    stage[0] = os.path.basename(workdir)
    return run_stage(*args, workdir=workdir, **kw)
  api.reconstruct = named_stage

  run_eval = evaluate.evaluate

  def marked_eval(logits_fn, batches, *args, desc="eval", **kw):
    def marked():
      for i, batch in enumerate(batches, 1):
        if not desc.endswith("FP"):
          mark(f"eval {i}")
        yield batch
    return run_eval(logits_fn, marked(), *args, desc=desc, **kw)
  evaluate.evaluate = marked_eval
  evaluate.SAVE_EVERY = EVAL_SAVE_EVERY

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def paused_finalize(self, *args, **kw):
    step_dir, item = os.path.split(str(self.get_final()))
    if step_dir.endswith(".orbax-checkpoint-tmp") and "synthetic" in step_dir:
      mark(f"save synth {os.path.basename(step_dir).split('.')[0]} {item}")
    return await finalize(self, *args, **kw)
  atomicity.AtomicRenameTemporaryPath.finalize = paused_finalize

  atomic_path = checkpoint.atomic_path

  @contextlib.contextmanager
  def paused_atomic_path(path):
    with atomic_path(path) as tmp:
      yield tmp
      mark(f"save {os.path.basename(path)}")
  checkpoint.atomic_path = paused_atomic_path


def run(workdir: str) -> None:
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  main._quiet_libraries()  # pylint: disable=protected-access
  stages, c = config()
  instrument(stages)
  with interrupt.stop_on_sigterm():
    out = main.run(c, workdir, stages)
  print("REPORT", os.path.join(workdir, "report.json"), out["quant_top1"], flush=True)


if __name__ == "__main__":
  run(sys.argv[1])
