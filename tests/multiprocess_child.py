"""One process of a (possibly multi-process) run of the tiny pipeline: `main.run` with the
real synthesis (checkpointed), reconstruction (checkpointed), evaluation and export.

usage: python multiprocess_child.py WORKDIR
The process count and id come from the environment, as on a cluster (SPDFQ_DISTRIBUTED,
JAX_COORDINATOR_ADDRESS, SPDFQ_NUM_PROCESSES, SPDFQ_PROCESS_ID); XLA_FLAGS gives the
devices. Prints, as JSON, every file this process opened for writing (or renamed, or
removed) under WORKDIR and every export it wrote (safetensors writes outside Python's
view), so that the test can see who writes what, and what a checkpoint of global,
host-local and numpy leaves restores to.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import main_child  # noqa: E402  pylint: disable=wrong-import-position
from spdfq_jax import (  # noqa: E402  pylint: disable=wrong-import-position
    checkpoint, main, parallel)

WRITE_EVENTS = ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move")


def config(stages_and_config):
  """The tiny pipeline, cut to seconds, with every stage that writes switched on."""
  stages, c = stages_and_config
  c.methods, c.num_images, c.export = "inversion,real", 4, True
  c.synth.iterations, c.synth.warmup, c.synth.checkpoint_every = 4, 1, 2
  c.quant.recon.iters = 1  # the reconstruction checkpoints after every unit
  c.eval.limit, c.eval.batch_size = 61, 16  # uneven shares, a padded last batch
  return stages, c


def watch_writes(root: str) -> list[str]:
  """Records the paths under `root` that this process writes (Python-level file access)."""
  root = os.path.realpath(root)
  seen: list[str] = []

  def hook(event, args):
    if event == "open":
      path, mode, flags = args
      writing = (mode is not None and any(ch in mode for ch in "wax+")) or (
          mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
    else:
      path, writing = args[0] if args else None, event in WRITE_EVENTS
    if writing and isinstance(path, (str, bytes, os.PathLike)):
      path = os.path.realpath(os.fsdecode(path))
      if path.startswith(root + os.sep):
        seen.append(os.path.relpath(path, root))

  sys.addaudithook(hook)
  return seen


def checkpoint_round_trip(directory: str) -> dict:
  """Saves and restores a batch-sharded global array, a host-local array (every process
  holding the same value) and a numpy scalar; returns what came back, as lists."""
  mesh = parallel.data_mesh()
  state = {"global": parallel.shard_batch(np.arange(8.0, dtype=np.float32) * 3, mesh),
           "local": jnp.arange(3, dtype=jnp.float32) + 0.5, "step": np.asarray(7, np.int32)}
  checkpoint.save(checkpoint.manager(directory), 1, state)
  like = {"global": parallel.shard_batch(np.zeros(8, np.float32), mesh),
          "local": jnp.zeros(3, jnp.float32), "step": np.asarray(0, np.int32)}
  step, got = checkpoint.restore_latest(checkpoint.manager(directory), like)
  return {"step": step, "values": {k: parallel.to_host(v).tolist() for k, v in got.items()},
          "global_sharding": list(got["global"].sharding.spec),
          "local_on_this_process": bool(got["local"].is_fully_addressable)}


if __name__ == "__main__":
  workdir = sys.argv[1]
  parallel.maybe_initialize_distributed()
  writes = watch_writes(workdir)
  stages, c = config(main_child.tiny_pipeline())
  exports = []
  save_export = stages.export
  stages.export = lambda path, qm: (exports.append(os.path.relpath(path, workdir)),
                                    save_export(path, qm))
  main.run(c, workdir, stages)
  round_trip = checkpoint_round_trip(os.path.join(workdir, "round_trip"))
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "devices": jax.device_count(), "writes": sorted(set(writes)),
                    "exports": exports, "round_trip": round_trip}))
