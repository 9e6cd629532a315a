"""How far each named option moves the PSAQ-ViT loop from the reference code.

  python benchmarks/reference_options.py

On the reference fixtures (tests/fixtures/psaq_reference: what zkkli/PSAQ-ViT computed on
tiny random ViT and Swin models), step 0 from the reference's own start image: the total
loss's relative error and the input gradient's cosine against the reference's recorded
values, for the default (the reference's behaviour) and for each option that leaves it.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import parity_util  # noqa: E402

from spdfq_jax.synth import objective as objective_lib  # noqa: E402

OPTIONS = {"default (reference)": {}, "entropy_grid='image'": {"entropy_grid": "image"},
           "entropy_swin_all_tokens": {"entropy_swin_all_tokens": True}}


def distance(name: str, overrides: dict) -> tuple[float, float]:
  """(total loss rel. error, gradient cosine) against the reference at step 0."""
  module, params, cfg, info, fixed, ref = parity_util.psaq_case(name)
  cfg.update(overrides)
  b = ref["images0"].shape[0]
  dev = {"mask": jnp.ones(b), "index": jnp.arange(b), "targets": jnp.asarray(fixed["targets"]),
         "region_targets": jnp.asarray(fixed["region_targets"]), "priors": []}
  row = parity_util.psaq_plan(ref).row(0)
  objective = lambda x: sum(
      objective_lib.loss_terms(module, params, x, dev, row, cfg, info, ())[0].values())
  total, grad = jax.value_and_grad(objective)(jnp.asarray(ref["images0"]))
  return (abs(float(total) - ref["total"][0]) / abs(ref["total"][0]),
          parity_util.cosine(grad, ref["grad"][0]))


def main() -> None:
  print("| option | model | total loss rel. error | gradient cosine |")
  print("|---|---|---|---|")
  for label, overrides in OPTIONS.items():
    for name in ("vit", "swin"):
      if "swin" in label and name != "swin":
        continue
      err, cos = distance(name, overrides)
      print(f"| {label} | {name} | {err:.2e} | {cos:.4f} |", flush=True)


if __name__ == "__main__":
  main()
