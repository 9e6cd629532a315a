"""A synthetic calibration set (`SynthResult`) and its file: result.npz (images, labels,
priors, diagnostics) with diagnostics.json beside it."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import ml_collections
import numpy as np

from spdfq_jax import checkpoint

SUBDIR = "synthetic"  # generate()'s own subdirectory of the directory it is given
RESULT = "result.npz"
DIAGNOSTICS = "diagnostics.json"


@dataclasses.dataclass
class SynthResult:
  """Synthetic calibration set. Images are NHWC and normalised; optimised images lie in the
  valid pixel range (the noise baseline is raw N(0, 1) unless `clamp_init`)."""
  images: np.ndarray  # (n, H, W, C) float32
  classes: np.ndarray  # (n,) int32 target class of each whole image
  targets: np.ndarray  # (n, num_classes) soft (SL) or one-hot targets
  region_classes: Optional[np.ndarray] = None  # (n, R) MSR classes
  region_targets: Optional[np.ndarray] = None  # (n, R, num_classes)
  # APA priors, one (n, heads, G) per APA block; drawn for every method (APA aligns to
  # them, the other methods are measured against them).
  priors: Optional[list[np.ndarray]] = None
  apa_blocks: tuple[int, ...] = ()  # 0-based block index of each prior
  diagnostics: dict = dataclasses.field(default_factory=dict)  # see `diagnostics`
  # SMI: (n, K) 0-based patch indices left unmasked, ascending; calibration keeps only
  # these patch tokens (the others are zero in `images`).
  kept_patches: Optional[np.ndarray] = None


def save_result(directory: str, result: SynthResult, cfg: ml_collections.ConfigDict) -> None:
  """diagnostics.json, then the npz (images, labels, priors, diagnostics), each written
  atomically; the npz last, since a resume takes its presence for a finished set."""
  arrays = {"images": result.images, "classes": result.classes, "targets": result.targets,
            "apa_blocks": np.asarray(result.apa_blocks, np.int32)}
  if result.region_classes is not None:
    arrays["region_classes"] = result.region_classes
    arrays["region_targets"] = result.region_targets
  if result.kept_patches is not None:
    arrays["kept_patches"] = result.kept_patches
  for j, p in enumerate(result.priors or []):
    arrays[f"prior_{j}"] = p
  arrays["diagnostics"] = np.asarray(json.dumps(result.diagnostics))
  checkpoint.write_text(os.path.join(directory, DIAGNOSTICS),
                        json.dumps(result.diagnostics, indent=1))
  with checkpoint.atomic_path(os.path.join(directory, RESULT)) as tmp:
    np.savez(tmp, **arrays)


def load_result(path: str) -> SynthResult:
  """Reads a `result.npz` written by `generate`."""
  z = np.load(path)
  pri = [z[f"prior_{j}"] for j in range(len([k for k in z.files if k.startswith("prior_")]))]
  return SynthResult(z["images"], z["classes"], z["targets"],
                     z["region_classes"] if "region_classes" in z.files else None,
                     z["region_targets"] if "region_targets" in z.files else None,
                     pri or None, tuple(int(v) for v in z["apa_blocks"]),
                     json.loads(str(z["diagnostics"])) if "diagnostics" in z.files else {},
                     z["kept_patches"] if "kept_patches" in z.files else None)
