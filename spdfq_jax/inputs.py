"""Input checks that run before any stage: command-line overrides that name no field, and
every setting that can be checked without the model or the data. A bad one stops the run
with one `InputError` naming the field or file and the fix."""
from __future__ import annotations

import difflib
import os

from absl import flags
import ml_collections
from ml_collections import config_flags

from spdfq_jax import data as data_lib
from spdfq_jax.models import zoo
from spdfq_jax.rows import REAL, Stages, assign, quant_config, rows_of, set_fields


class InputError(ValueError):
  """A bad setting, input file or directory; the message names it and the fix."""


def override_problems(argv: list[str], default_config: str) -> list[str]:
  """One line per --config.<path>=... argument whose path names no field of the config,
  with the nearest field and the fields there are."""
  config_arg = default_config
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      config_arg = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      config_arg = argv[i + 1]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", config_arg, flag_values=fv,
                                  sys_argv=["prog", f"--config={config_arg}"])
  fv(["prog", f"--config={config_arg}"])
  config = fv.config
  out = []
  for a in argv:
    if not a.startswith("--config."):
      continue
    path = a[len("--config."):].split("=", 1)[0]
    node, done = config, []
    for part in path.split("."):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        done.append(part)
        continue
      keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      where = ".".join(done) or "the config"
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f" Did you mean --config.{'.'.join(done + close)}?" if close else ""
      listed = f" Fields of {where}: {', '.join(keys)}." if keys else f" {where} is not a block."
      out.append(f"{a}: {config_arg} has no field {'.'.join(done + [part])!r}.{hint}{listed}")
      break
  return out


def validate(config: ml_collections.ConfigDict, stages: Stages) -> None:
  """Every setting that can be checked without the model or the data, before anything
  runs: one InputError naming the field and the fix."""
  from spdfq_jax.synth import config as synth_config  # pylint: disable=g-import-not-at-top
  methods = [m.strip() for m in config.methods.split(",") if m.strip()]
  known = tuple(synth_config.METHODS) + (REAL,)
  bad = [m for m in methods if m not in known]
  if not methods or bad:
    what = "unknown " + ", ".join(bad) if bad else "empty"
    raise InputError(f"methods={config.methods!r}: {what}; choose from {', '.join(known)} "
                     "(comma-separated).")
  field = "bits" if config.bits else "quant.w_bits / quant.a_bits"
  try:
    rows = rows_of(config)
  except ValueError as e:
    raise InputError(f"bits={config.bits!r}: {e}, e.g. --config.bits=w4a4,w3a3.") from e
  for _, w, a in rows:
    for kind, b in (("weight", w), ("activation", a)):
      if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
        raise InputError(f"{field}: {kind} bits {b!r} are not an integer in 2..8 "
                         "(the paper's settings are 4 and 6).")
  for name, value, low in (("num_images", config.num_images, 1),
                           ("eval.batch_size", config.eval.batch_size, 1),
                           ("eval.limit", config.eval.limit, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise InputError(f"{name}={value!r}: must be an integer >= {low}"
                       + (" (the paper calibrates on 32 images)." if name == "num_images" else "."))
  if config.data.name not in ("imagenet",) + data_lib.TEST_BEDS:
    raise InputError(f"data.name={config.data.name!r}: must be imagenet, "
                     f"{', '.join(data_lib.TEST_BEDS)}.")
  if config.data.source not in ("auto", "folder", "tfds"):
    raise InputError(f"data.source={config.data.source!r}: must be auto, folder or tfds.")
  for _, w, a in rows:
    try:
      quant_config(stages, config, w, a)
    except (ValueError, KeyError) as e:
      raise InputError(f"quant: {e}") from e
  for method in set(methods) - {REAL}:
    try:
      scfg = stages.synth_config(method, "vit")
      for k, v in set_fields(config.synth).items():
        assign(scfg, k, v)
    except (ValueError, KeyError) as e:
      raise InputError(f"synth: {e}") from e
  validate_model(config)
  dst = config.get("export_to")
  if dst:
    if len(rows) != 1:
      raise InputError(f"export_to={dst!r} takes the one row of a single-row config; this one "
                       f"has {len(rows)}. Copy rows/*/quantized.safetensors instead.")
    if os.path.exists(dst):
      raise InputError(f"export_to={dst!r} exists: delete it or choose another path (the "
                       "quantized model is also kept in the row's directory of the workdir).")


def validate_model(config: ml_collections.ConfigDict) -> None:
  """model.name / arch / checkpoint: something to load, and a file that is there."""
  from spdfq_jax.models import arch, convert  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.get("arch"):
    try:
      arch.parse(m.arch)
    except ValueError as e:
      raise InputError(f"model.arch: {e}") from e
  if not m.checkpoint:
    if m.name in convert.ASSETS:
      return
    if m.name not in zoo.REGISTRY:
      raise InputError(f"model.name: {convert.unknown_model_message(m.name or '')} Or give a "
                       "checkpoint: --config.model.checkpoint=FILE.")
    tag = zoo.entry(m.name).checkpoint_tag
    raise InputError(f"model.checkpoint is empty: nothing is downloaded at run time. Get {tag} "
                     f"(huggingface.co/timm/{tag}) and pass --config.model.checkpoint=FILE.")
  if not os.path.isfile(m.checkpoint):
    tag = zoo.entry(m.name).checkpoint_tag if m.name in zoo.REGISTRY else None
    get = (f" Get it with `huggingface-cli download timm/{tag} --local-dir "
           f"checkpoints/{tag}`." if tag else "")
    raise InputError(f"model.checkpoint={m.checkpoint!r} is not a file.{get}")
