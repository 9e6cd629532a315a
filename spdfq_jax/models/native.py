"""The project's own checkpoint format: one .safetensors file.

Tensors are the Flax params flattened with '/' joining the path; the metadata holds
`spdfq_jax` = JSON {family, kwargs, preprocessing, ...}, enough to rebuild the module
without any other file.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import flax
import jax
import numpy as np
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from spdfq_jax import checkpoint
from spdfq_jax.models import zoo

META_KEY = "spdfq_jax"


def flatten(params: Any) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  # Contiguous copies: safetensors writes a strided (e.g. transposed) array's raw buffer.
  return {k: np.ascontiguousarray(jax.device_get(v)) for k, v in flat.items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def describe(module: zoo.Model) -> dict:
  """JSON-able description of an architecture (quant-point factory excluded)."""
  family = zoo.family(module)
  kwargs = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.name not in zoo.NOT_ARCHITECTURE}
  return {"family": family, "kwargs": {k: list(v) if isinstance(v, tuple) else v
                                      for k, v in kwargs.items()}}


def rebuild(desc: dict) -> zoo.Model:
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in desc["kwargs"].items()}
  cls = zoo.SwinTransformer if desc["family"] == "swin" else zoo.VisionTransformer
  return cls(**kwargs)


def save(path: str, module: zoo.Model, params: Any,
         preprocessing: Optional[zoo.Preprocessing] = None, **extra: Any) -> None:
  """Writes params + architecture (+ preprocessing and any JSON-able extras)."""
  meta = {**describe(module), **extra}
  if preprocessing is not None:
    meta["preprocessing"] = dataclasses.asdict(preprocessing)
  with checkpoint.atomic_path(path) as tmp:
    save_file(flatten(params), tmp, metadata={META_KEY: json.dumps(meta)})


def read_metadata(path: str) -> Optional[dict]:
  """The spdfq_jax metadata of a .safetensors file, or None for a foreign file."""
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
  return json.loads(meta[META_KEY]) if META_KEY in meta else None


def load(path: str) -> tuple[zoo.Model, dict, dict]:
  """(module, params, metadata) from a file written by `save`."""
  meta = read_metadata(path)
  if meta is None:
    raise ValueError(f"{path} is not a spdfq_jax checkpoint (no '{META_KEY}' metadata).")
  return rebuild(meta), unflatten(load_file(path)), meta
