"""checkpoint.atomic_path: a file is replaced whole or not at all."""
import os

import numpy as np
import pytest

from spdfq_jax import checkpoint


def test_atomic_path_replaces_only_when_the_write_finishes(tmp_path):
  path = tmp_path / "result.npz"
  with checkpoint.atomic_path(str(path)) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".npz")
    np.savez(tmp, x=np.arange(3))
    assert not path.exists()  # nothing visible before the block ends
  with pytest.raises(RuntimeError):
    with checkpoint.atomic_path(str(path)) as tmp:
      np.savez(tmp, x=np.arange(5))
      raise RuntimeError("writer failed")
  with np.load(path) as z:
    np.testing.assert_array_equal(z["x"], np.arange(3))  # the old file, whole
  assert os.listdir(tmp_path) == ["result.npz"]  # the failed write left nothing behind


def test_write_text(tmp_path):
  path = tmp_path / "report.json"
  checkpoint.write_text(str(path), "old")
  checkpoint.write_text(str(path), "new")
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["report.json"]
