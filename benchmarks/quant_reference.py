"""How far each named quantization option moves this package from I&S-ViT's code.

  python benchmarks/quant_reference.py [--models vit,swin]

On the reference fixtures (tests/fixtures/quant_reference: what zysxmu/IaS-ViT computed on
tiny random ViT (W4A4) and Swin (W3A3) models), for the default (the reference's behaviour)
and for each option of docs/quantization.md's deviation table put back alone:
  states   the largest relative error of any activation or weight quantizer state, each
           point calibrated on the reference's own upstream (as tests/test_quant_reference.py)
  logits   relative error of the logits after calibration, reparameterisation and weight
           quantization run end to end by `quant.calibrate` / `reparameterize` / `weight_state`
           (differences in the last bits cascade through later searches, so the default is
           not 0 here)
  loss     relative error of the first reconstruction step's loss (stage three's block)
  grad     the smallest cosine between that step's gradient and the reference's, over the
           parameters the reference trains (LayerNorm gradients count as 0 there)
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import parity_util as P  # noqa: E402
import test_quant_reference as T  # noqa: E402
from spdfq_jax import quant  # noqa: E402
from spdfq_jax.models import convert, zoo  # noqa: E402

R = T.R

OPTIONS = {
    "default (reference)": {},
    "Q1 calib.order='fp'": {"calib_order": "fp"},
    "Q2 acts.method='minmax'": {"a_method": "minmax"},
    "Q4 acts.reduction_post_ln": {"acts.reduction_post_ln": True},
    "Q5 softmax.quantizer='log_sqrt2'": {"softmax_quantizer": "log_sqrt2"},
    "Q6 keep_fp=[]": {"keep_fp": []},
    "Q7 reparam_round_zero": {"reparam_round_zero": True},
    "Q8 weights.method='mse'": {"w_method": "mse"},
    "Q10 recon.train='all'": {"recon_train": "all"},
    "Q11 recon.loss='mean'": {"recon_loss": "mean"},
}


def rel(a, b) -> float:
  return P.rel_err(a, b)


def state_error(got: dict, want: dict) -> float:
  if set(got) != set(want):
    return float("inf")
  return max(rel(np.reshape(got[k], np.shape(w)), w) if np.any(w) else
             float(np.abs(np.asarray(got[k])).max()) for k, w in want.items())


def distance(name: str, overrides: dict) -> dict:
  module, params, ref = P.quant_case(name)
  cfg = quant.default_config(int(ref["w_bits"]), int(ref["a_bits"]), **overrides)
  out = {}
  acts, _ = T.ours(name, module, ref, "calib/acts/")
  try:
    found = T.forced_calibration(module, params, cfg, acts, ref["calib_images"])
    err = state_error(found, acts)
  except Exception:  # a state of another shape or kind
    err = float("inf")
  p2, qs2 = quant.reparameterize(params, T.unflat(acts), cfg) if cfg.reparam else (params, None)
  _, want_w = T.ours(name, module, ref, "calib/weights/")
  _, sd = convert.load_state_dict(module, P.state_dict(ref, "calib/reparam_sd/"))
  out["states"] = max(err, state_error(T.flat(quant.weight_state(sd, cfg)), want_w))
  qs = quant.calibrate(module, params, ref["calib_images"], cfg)
  p2, qs2 = quant.reparameterize(params, qs, cfg)
  ws = quant.weight_state(p2, cfg)
  out["logits"] = rel(T.logits(module, cfg, p2, qs2, ws, ref["eval_images"]),
                      ref["calib/weights/logits"])
  try:
    out.update(recon_distance(name, module, ref, cfg))
  except KeyError:  # the reference's state does not fit this option's quantizer
    out.update(loss=float("nan"), grad=float("nan"))
  return out


def recon_distance(name: str, module, ref: dict, cfg) -> dict:
  out = {}
  pre = "recon/stage3/"
  unit = str(ref[pre + "unit"])
  _, bp = convert.load_state_dict(module, P.state_dict(ref, pre + "sd/"))
  a3, w3 = T.ours(name, module, ref, pre + "state/")
  frozen = ml_collections.FrozenConfigDict(cfg)
  paths = dict(zoo.units(module))[unit]
  trainable = {p: R.get_subtree(bp, p) for p in paths}
  qmod = quant.quant_module(module, cfg)
  xs, ys = jnp.asarray(ref[pre + "inputs"]), jnp.asarray(ref[pre + "targets"])
  loss, grads = jax.value_and_grad(R.unit_loss, argnums=3)(
      qmod, unit, frozen, trainable, bp, T.unflat(a3), T.unflat(w3), xs, ys)
  out["loss"] = abs(float(loss) - ref[pre + "loss"][0]) / ref[pre + "loss"][0]
  sd = dict(P.state_dict(ref, pre + "sd/"))
  ref_grad = P.state_dict(ref, pre + "grad/")
  zero = {k: np.zeros_like(v) for k, v in sd.items() if k.startswith(unit + ".")}
  sd.update(zero)
  sd.update({unit + "." + k: v for k, v in ref_grad.items()})
  _, want = convert.load_state_dict(module, sd)
  trains = lambda p: R.trains(cfg.recon.train, p)
  cos = []
  for p in paths:
    g, w = T.flat({"x": grads[p]}), T.flat({"x": R.get_subtree(want, p)})
    for key in g:
      if np.any(w[key]):
        cos.append(P.cosine(g[key], w[key]))
      elif trains(p + tuple(key.split("/")[1:])) and np.any(g[key]):
        cos.append(0.0)  # trained here, not by the reference
  out["grad"] = min(cos)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="vit,swin")
  args = ap.parse_args()
  print("| option | model | states rel. err | logits rel. err | loss rel. err | grad cosine |")
  print("|---|---|---|---|---|---|")
  for label, overrides in OPTIONS.items():
    for name in args.models.split(","):
      if "reduction" in label and name != "swin":
        continue
      d = distance(name, overrides)
      print(f"| {label} | {name} | {d['states']:.1e} | {d['logits']:.1e} | {d['loss']:.1e} | "
            f"{d['grad']:.4f} |", flush=True)


if __name__ == "__main__":
  main()
