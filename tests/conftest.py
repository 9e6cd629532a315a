"""One persistent XLA compilation cache for the whole run.

Most of the suite's time is XLA compiling tiny models' steps, and many tests compile the
same programs (the same model's calibration, reconstruction and evaluation steps, in this
process, in the other xdist worker, or in a `main` subprocess). The cache directory is made
once by the process that starts pytest; the workers and every subprocess inherit it
through the environment, before jax is imported. Tests that need their own cache (a
restarted child reusing its first run's steps) still set theirs.

Tests marked `slow` form their own tier (`./run test-slow`); `./run test` runs the others.
"""
import os
import shutil
import tempfile

_OWNER = "SPDFQ_TEST_XLA_CACHE" not in os.environ
if _OWNER:
  os.environ["SPDFQ_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="spdfq_jax_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["SPDFQ_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
  if _OWNER and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["SPDFQ_TEST_XLA_CACHE"], ignore_errors=True)

