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


PSAQ_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "psaq_reference")


def psaq_case(name: str):
  """(module, params, psaq config, ModelInfo, per-image fixed arrays, reference arrays) of a
  fixture written by tests/fixtures/make_psaq_reference.py."""
  from spdfq_jax import models, synth  # pylint: disable=g-import-not-at-top
  from spdfq_jax.synth import layout as layout_lib  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(PSAQ_DIR, f"{name}.npz"), allow_pickle=False) as f:
    ref = dict(f)
  arch = json.loads(str(ref["arch"]))
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch["kwargs"].items()}
  build = zoo.custom_swin if arch["family"] == "swin" else zoo.custom_vit
  module, params = models.load(build(**kwargs), os.path.join(PSAQ_DIR, f"{name}.safetensors"))
  cfg = synth.default_config("psaq", arch["family"])
  b = ref["images0"].shape[0]
  cfg.update(num_images=b, mean=tuple(ref["mean"].tolist()), std=tuple(ref["std"].tolist()))
  info = layout_lib.model_info(module, params, cfg)
  fixed = {"targets": np.eye(info.num_classes, dtype=np.float32)[ref["labels"]],
           "region_targets": np.zeros((b, 4, info.num_classes), np.float32), "priors": []}
  return module, params, cfg, info, fixed, ref


def psaq_plan(ref: dict[str, np.ndarray], steps: int | None = None):
  """The reference's recorded lr, offsets, flips and TV target as a `Plan`."""
  from spdfq_jax.synth import plan as plan_lib  # pylint: disable=g-import-not-at-top
  s = len(ref["lr"]) if steps is None else steps
  z = np.zeros(s, np.int32)
  return plan_lib.Plan(ref["lr"][:s].astype(np.float32), ref["shift"][:s].astype(np.int32),
                       ref["flip"][:s].astype(bool), z, z.astype(bool),
                       float(ref["tv_target"]))


def cosine(a, b) -> float:
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
