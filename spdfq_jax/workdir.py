"""The workdir: a stage's identity (a hash of everything that determines its output names
its directory), the refusal of a workdir that holds another config, config.json, and the
finished calibration sets under synthetic/ (older layouts moved into place)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import flax
import jax
import ml_collections
import numpy as np

from spdfq_jax import checkpoint, parallel, report
from spdfq_jax.inputs import InputError
from spdfq_jax.models import zoo

CONFIG_FILE = "config.json"
SET_FILE = "result.npz"  # a calibration set: images (+ labels, priors, diagnostics)
# Config fields that change no result: a workdir holding a config that differs only in
# these is the same run ('paper_top1': the paper numbers' earlier field).
COSMETIC = ("title", "description", "data.workers", "paper", "paper_top1", "export",
            "export_to")


def fingerprint(*parts: Any) -> str:
  """Short stable hash of JSON-able parts: names a stage directory after its inputs."""
  text = json.dumps(report.to_jsonable(parts), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def model_key(config: ml_collections.ConfigDict) -> dict:
  """What identifies the FP model: name, path, and the file's size and mtime (new weights at
  the same path must not reuse results)."""
  key = config.model.to_dict()
  if not key.get("arch"):  # unset: the same key as before the field existed
    key.pop("arch", None)
  path = config.model.checkpoint
  if path and os.path.exists(path):
    st = os.stat(path)
    key["file"] = [st.st_size, int(st.st_mtime)]
  return key


def data_key(config: ml_collections.ConfigDict) -> dict:
  """What identifies the data (the number of decoding threads does not)."""
  return {k: v for k, v in config.data.to_dict().items() if k != "workers"}


def config_changes(old: dict, new: dict) -> list[str]:
  """'field: old -> new' for every setting that differs (fields one side lacks count only
  when set, so a field added to the configs since does not)."""
  a, b = (flax.traverse_util.flatten_dict(d, sep=".") for d in (old, new))
  unset = (None, "", [], {})
  out = []
  for k in sorted(set(a) | set(b)):
    if k in COSMETIC or k.split(".")[0] in COSMETIC:
      continue
    va, vb = a.get(k), b.get(k)
    if va != vb and not (va in unset and vb in unset):
      out.append(f"{k}: {json.dumps(va)} -> {json.dumps(vb)}")
  return out


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, reuse: bool) -> None:
  """Creates the workdir and checks that it is writable and holds no other config."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise InputError(f"workdir {workdir!r} is not a writable directory ({e.strerror or e}): "
                     "pass --workdir=DIR somewhere you can write.") from e
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json_best_effort())
  old = report.read_json(path) if os.path.exists(path) else None
  changes = config_changes(old, new) if old is not None else []
  if changes and not reuse:
    listed = "\n  ".join(changes[:20]) + (f"\n  ... and {len(changes) - 20} more"
                                          if len(changes) > 20 else "")
    raise InputError(
        f"workdir {workdir!r} holds a run of another config ({len(changes)} fields differ):\n"
        f"  {listed}\nUse another --workdir, or --reuse_workdir to run here anyway (the "
        "finished stages of both stay cached; config.json and the report then describe "
        "this run).")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """config.json: the config this workdir now describes (process 0 writes it)."""
  if jax.process_index() == 0:
    checkpoint.write_text(os.path.join(workdir, CONFIG_FILE),
                          config.to_json_best_effort(indent=2))


def default_workdir(config_arg: str) -> str:
  """workdirs/<config file stem>[_<arg>]: 'configs/vit_base.py:w6a6' -> workdirs/vit_base_w6a6."""
  path, _, arg = config_arg.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  suffix = "_" + "".join(ch if ch.isalnum() else "_" for ch in arg) if arg else ""
  return os.path.join("workdirs", stem + suffix)


def read_set(directory: str) -> Optional[tuple[np.ndarray, dict, Optional[np.ndarray]]]:
  """(images, diagnostics, kept patches or None) of a finished calibration set in
  `directory`, or None. Kept patches: SMI's unmasked patches per image."""
  path = os.path.join(directory, SET_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    diag = json.loads(str(z["diagnostics"])) if "diagnostics" in z.files else {}
    return z["images"], diag, z["kept_patches"] if "kept_patches" in z.files else None


def flatten_synth_dir(directory: str) -> None:
  """Moves a finished synthesis out of generate()'s subdirectory into `directory`.

  The result file moves last, so a kill midway leaves it inside and the next run finishes
  the move. In a multi-process run process 0 moves them once every process is done with
  the synthesis, and the others wait.
  """
  parallel.barrier(f"synthesis done: {directory}")
  parallel.on_primary(f"synthesis moved: {directory}", _move_up, directory)


def _move_up(directory: str) -> None:
  from spdfq_jax.synth.result import SUBDIR  # pylint: disable=g-import-not-at-top
  inner = os.path.join(directory, SUBDIR)
  if not os.path.exists(os.path.join(inner, SET_FILE)):
    return
  for name in sorted(os.listdir(inner), key=lambda n: n == SET_FILE):
    src, dst = os.path.join(inner, name), os.path.join(directory, name)
    if os.path.isdir(dst) and not os.path.islink(dst):
      shutil.rmtree(dst)
    os.replace(src, dst)
  with contextlib.suppress(OSError):
    os.rmdir(inner)


def save_set(directory: str, images: np.ndarray, labels: np.ndarray,
             pre: zoo.Preprocessing) -> None:
  """Writes a real calibration set: the grid, then result.npz (whose presence marks it done)."""
  os.makedirs(directory, exist_ok=True)
  _save_grid(directory, images, pre)
  with checkpoint.atomic_path(os.path.join(directory, SET_FILE)) as tmp:  # last: marks it done
    np.savez(tmp, images=images, classes=labels)


def _save_grid(directory: str, images: np.ndarray, pre: zoo.Preprocessing) -> None:
  c = images.shape[-1]
  mean = pre.mean if len(pre.mean) == c else pre.mean[:1] * c
  std = pre.std if len(pre.std) == c else pre.std[:1] * c
  report.save_image_grid(os.path.join(directory, "grid.png"), images, mean, std)
