"""Reading the timm parity fixtures written by tests/fixtures/make_parity_fixtures.py."""
from __future__ import annotations

import json
import os

import numpy as np

from spdfq_jax.models import zoo

PARITY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "parity")
FIXTURES = ("vit", "deit_distilled", "swin")


def fixture(name: str) -> tuple[zoo.Model, str, dict[str, np.ndarray]]:
  """(module built from the stored arch, path of the timm .safetensors, reference arrays)."""
  with np.load(os.path.join(PARITY_DIR, f"{name}.npz"), allow_pickle=False) as f:
    ref = dict(f)
  arch = json.loads(str(ref.pop("arch")))
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch["kwargs"].items()}
  build = zoo.custom_swin if arch["family"] == "swin" else zoo.custom_vit
  return build(**kwargs), os.path.join(PARITY_DIR, f"{name}.safetensors"), ref


def attn_refs(ref: dict[str, np.ndarray]) -> list[np.ndarray]:
  n = sum(k.startswith("attn_") for k in ref)
  return [ref[f"attn_{i}"] for i in range(n)]


def rel_err(a, b) -> float:
  """max |a - b| / max |b|: the parity criterion (<= 1e-4)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())
