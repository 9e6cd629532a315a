"""Full-size registry models against timm, random weights at 224 x 224 (opt-in).

Needs torch + timm (`pip install -e .[parity]`) and SPDFQ_FULL_PARITY=1; takes minutes
on a CPU. Prints max|diff| / max|logit| for each model.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from spdfq_jax import models
from spdfq_jax.models import taps
from parity_util import rel_err

pytestmark = pytest.mark.skipif(os.environ.get("SPDFQ_FULL_PARITY") != "1",
                                reason="set SPDFQ_FULL_PARITY=1 (needs torch + timm)")

NAMES = ("vit_base_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224",
         "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224")


@pytest.mark.parametrize("name", NAMES)
def test_full_size_parity(name, tmp_path):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  from safetensors.torch import save_file
  from fixtures.make_parity_fixtures import perturb, run_timm

  timm.layers.set_fused_attn(False)
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False).eval()
  perturb(model, seed=0)
  images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
  want, want_attn = run_timm(model, images)
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  if name.startswith("swin"):  # also exercise the original Microsoft .pth layout
    ms = {re.sub(r"^layers\.(\d+)\.downsample",
                 lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k).replace("head.fc.", "head."): v
          for k, v in sd.items()}
    path = str(tmp_path / "model.pth")
    torch.save({"model": ms}, path)
  else:
    path = str(tmp_path / "model.safetensors")
    save_file(sd, path)
  module, params = models.load(name, path)
  logits, attn, _ = taps.apply_with_attention(module, {"params": params},
                                              images.permute(0, 2, 3, 1).numpy())
  err = rel_err(logits, want)
  attn_err = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(attn, want_attn))
  print(f"\n{name}: max|diff|/max|logit| = {err:.2e} (max|logit| {np.abs(want).max():.3g}); "
        f"attention max|diff| = {attn_err:.2e}")
  assert len(attn) == len(want_attn)
  assert err <= 1e-4
  assert attn_err <= 1e-4
