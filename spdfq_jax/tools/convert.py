"""Converts a timm / original DeiT or Swin / Google AugReg checkpoint to this project's
own format: one .safetensors whose metadata holds the architecture (and the evaluation
preprocessing), so that `main` needs nothing but its path.

  python -m spdfq_jax.tools.convert SRC DST [--arch=SPEC] [--preprocessing=...] [--overwrite]

--arch is a registry name or a spec as in spdfq_jax/models/arch.py
('vit:num_heads=4'); left out, it is read from SRC's shapes, which give every field but
a timm ViT's heads and a Swin's input size. --preprocessing is a registry name whose
transform to store, or fields of `zoo.Preprocessing` ('crop_pct=0.9,mean=[0.5,0.5,0.5],
std=[0.5,0.5,0.5]'); by default the registry's when --arch names one. DST is never
overwritten unless --overwrite.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

from absl import app, flags

from spdfq_jax import models
from spdfq_jax.models import arch as arch_lib
from spdfq_jax.models import native, zoo

_ARCH = flags.DEFINE_string("arch", None, "Architecture: registry name or spec "
                            "('vit:num_heads=4'); default: read from the file's shapes.")
_PRE = flags.DEFINE_string("preprocessing", None, "Registry name, or fields of "
                           "zoo.Preprocessing ('crop_pct=0.9,mean=[0.5,0.5,0.5]').")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace DST if it exists.")


def preprocessing(spec: Optional[str], arch: Optional[str]) -> Optional[zoo.Preprocessing]:
  """The transform to store: `spec` (registry name or fields), else --arch's registry
  entry's, else none (main then uses timm's defaults at the model's input size)."""
  base = (arch or "").partition(":")[0].strip()
  if not spec:
    return zoo.entry(base).preprocessing if base in zoo.REGISTRY else None
  if spec in zoo.REGISTRY:
    return zoo.entry(spec).preprocessing
  allowed = tuple(f.name for f in dataclasses.fields(zoo.Preprocessing))
  kwargs = arch_lib.parse_items(spec, allowed, f"preprocessing {spec!r}")
  return zoo.Preprocessing(**kwargs)


def convert(src: str, dst: str, arch: Optional[str] = None, pre: Optional[str] = None,
            overwrite: bool = False) -> str:
  """Writes SRC as our format at DST; returns a one-line summary."""
  if not dst.endswith(".safetensors"):
    raise ValueError(f"{dst}: the output is a .safetensors file; name it so.")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError(f"{dst} is the input itself; choose another output path.")
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists: choose another path, or pass --overwrite.")
  module, params = models.load(arch or None, src)
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  native.save(dst, module, params, preprocessing(pre, arch), source=os.path.basename(src))
  models.load(None, dst)  # what was written loads back
  size = os.path.getsize(dst) / 2 ** 20
  return f"wrote {dst} ({size:.1f} MiB): {arch_lib.module_spec(module)}"


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError("usage: python -m spdfq_jax.tools.convert SRC DST [--arch=SPEC] "
                         "[--preprocessing=...] [--overwrite]")
  try:
    print(convert(argv[1], argv[2], _ARCH.value, _PRE.value, _OVERWRITE.value))
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    sys.exit(f"error: {e}")
  print("use it with: python -m spdfq_jax.main --config=CONFIG "
        f"--config.model.checkpoint={argv[2]}")


if __name__ == "__main__":
  app.run(main)
