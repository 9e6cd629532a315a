"""The command line: runs the whole pipeline for one config (`pipeline.run`):
synthesize -> quantize -> evaluate -> export.

  python -m spdfq_jax.main --config=configs/fmnist_w4a4.py [--workdir=DIR] \
      [--config.quant.w_bits=3 --config.synth.iterations=200 ...]

A config may compare several rows (synthesis method x bit setting); a restart skips
finished stages and resumes the interrupted one (see pipeline.py). The result table goes
to report.json / report.md and stdout. SIGTERM stops the run after the current step with
its state saved (exit status 143).

Inputs are checked before any stage runs: a bad setting, file or directory stops the run
with one message (`InputError`) that names the field or file and the fix; a workdir that
holds another config is refused (listing what differs) unless --reuse_workdir.

`run`, `Stages`, `default_stages`, `InputError` and `SET_FILE` are the Python API (a
notebook calls `main.run(config, workdir)`); they live in the modules named below.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from spdfq_jax import interrupt, parallel, report
from spdfq_jax.inputs import InputError, override_problems
from spdfq_jax.pipeline import run
from spdfq_jax.rows import Stages, default_stages
from spdfq_jax.workdir import SET_FILE, default_workdir

__all__ = ["InputError", "SET_FILE", "Stages", "default_stages", "main", "run"]

DEFAULT_CONFIG = "configs/fmnist_w4a4.py"


def _exit_on_unknown_fields(argv: list[str]) -> None:
  problems = override_problems(argv, DEFAULT_CONFIG)
  if problems:
    sys.exit("error: " + "\nerror: ".join(problems))


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing, except that an override of a field the config lacks exits with
  the field named instead of an AttributeError."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on "
             "flags.")
  except (AttributeError, KeyError):
    _exit_on_unknown_fields(argv)
    raise


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS,
                       argv: Optional[list[str]] = None) -> Any:
  """--config, whose overrides config_flags applies as it is defined: one naming no field
  of the config exits with the field named instead of an AttributeError."""
  try:
    return config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file (configs/*.py[:arg]).", flag_values=flag_values,
        lock_config=True, sys_argv=argv)
  except (AttributeError, KeyError):
    _exit_on_unknown_fields(argv if argv is not None else sys.argv)
    raise


_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; default workdirs/<config name>.")
_REUSE = flags.DEFINE_bool(
    "reuse_workdir", False, "Run in a workdir that holds another config: finished stages of "
    "either stay cached (each is keyed by its own settings); config.json and the report "
    "then describe this run.")


def _quiet_libraries() -> None:
  """Keeps INFO lines of this package only: checkpointing libraries log every save."""
  import logging as pylogging  # pylint: disable=g-import-not-at-top

  class Filter(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
      return record.levelno >= pylogging.WARNING or f"{os.sep}spdfq_jax{os.sep}" in record.pathname

  logging.get_absl_handler().addFilter(Filter())


def main(argv: list[str]) -> None:
  del argv
  _quiet_libraries()
  parallel.maybe_initialize_distributed()
  config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
  for a in sys.argv[1:]:  # keep the ':arg' part, which get_config_filename drops
    if a.startswith("--config=") and ":" in a:
      config_arg = a.split("=", 1)[1]
  workdir = _WORKDIR.value or default_workdir(config_arg)
  logging.info("config %s -> workdir %s; %d x %s", config_arg, workdir, jax.device_count(),
               jax.devices()[0].device_kind)
  try:
    with interrupt.stop_on_sigterm():
      out = run(_CONFIG.value, workdir, config_name=config_arg, reuse_workdir=_REUSE.value)
  except (InputError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  print()
  print(report.markdown(out).split("\n## Run")[0])
  print(f"report: {os.path.join(workdir, 'report.md')}  (total {out['total_seconds']:.1f} s)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

