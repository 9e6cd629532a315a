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


QUANT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "quant_reference")
QUANT_FIXTURES = ("vit", "swin")
# I&S-ViT quantizer module path suffix -> this package's point / kernel path suffix.
_QUANT_SUFFIXES = (("attn/matmul1/quantizer_A", "attn/q"), ("attn/matmul1/quantizer_B", "attn/k"),
                   ("attn/matmul2/quantizer_A", "attn/softmax"),
                   ("attn/matmul2/quantizer_B", "attn/v"))


def quant_case(name: str):
  """(module, FP params, reference arrays) of a fixture written by
  tests/fixtures/make_quant_reference.py."""
  from spdfq_jax import models  # pylint: disable=g-import-not-at-top
  (npz,) = [f for f in os.listdir(QUANT_DIR) if f.startswith(name + "-") and f.endswith(".npz")]
  with np.load(os.path.join(QUANT_DIR, npz), allow_pickle=False) as f:
    ref = dict(f)
  arch = json.loads(str(ref["arch"]))
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch["kwargs"].items()}
  build = zoo.custom_swin if arch["family"] == "swin" else zoo.custom_vit
  module, params = models.load(build(**kwargs), os.path.join(QUANT_DIR, npz[:-4] + ".safetensors"))
  return module, params, ref


def quant_path(torch_name: str, family: str) -> str:
  """This package's path for an I&S-ViT quantizer: 'blocks.0.attn.qkv.input_quantizer' ->
  'blocks_0/attn/qkv_in' (point), '...qkv.weight_quantizer' -> '.../attn/qkv/kernel'."""
  parts = torch_name.split(".")
  out = []
  for p in parts:
    if p.isdigit():
      out[-1] += "_" + p
    else:
      out.append(p)
  path = "/".join(out)
  path = path.replace("head/fc/", "head/")
  if family == "vit":
    path = path.replace("patch_embed/proj/", "patch_embed/")
  for theirs, ours in _QUANT_SUFFIXES:
    if path.endswith(theirs):
      return path[:-len(theirs)] + ours
  if path.endswith("/input_quantizer"):
    return path[:-len("/input_quantizer")] + "_in"
  if path.endswith("/weight_quantizer"):
    return path[:-len("/weight_quantizer")] + "/kernel"
  raise ValueError(f"unknown reference quantizer {torch_name!r}")


_FIELDS = {"delta": "scale", "zero_point": "zero", "shift": "shift", "minv": "lo", "maxv": "hi"}


def quant_states(ref: dict, prefix: str, family: str) -> tuple[dict, dict]:
  """({flat point path/field: value}, {flat kernel path/field: value}) of the reference
  arrays under `prefix` ('calib/acts/'), in this package's names and shapes (per-channel
  values flattened)."""
  acts, weights = {}, {}
  for key, value in ref.items():
    if not key.startswith(prefix) or key.endswith("logits") or "/" in key[len(prefix):].split(
        "/", 1)[0]:
      continue
    rest = key[len(prefix):]
    if rest.count("/") != 1:
      continue
    module, field = rest.split("/")
    path = quant_path(module, family)
    v = np.asarray(value, np.float64).reshape(-1) if np.ndim(value) else np.asarray(value,
                                                                                  np.float64)
    (weights if path.endswith("kernel") else acts)[path + "/" + _FIELDS[field]] = v
  return acts, weights


def state_dict(ref: dict, prefix: str) -> dict:
  """The timm state dict stored under `prefix` ('calib/reparam_sd/')."""
  return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
