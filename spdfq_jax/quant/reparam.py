"""Post-LayerNorm scale reparameterisation (RepQ-ViT).

Post-LN activations have a few channels with ranges far larger than the rest, so they are
calibrated per channel (scale s_c, zero z_c). A per-channel quantizer is costly to deploy;
instead the per-channel factors are folded into the LayerNorm affine and the next linear
layer so that one per-tensor quantizer (s~ = mean s_c, z~ = round(mean z_c)) does the
same job. With r1 = s / s~ and r2 = z - z~ (integers):

  LayerNorm:  gamma' = gamma / r1,   beta' = (beta + s * r2) / r1
  next layer: W' = diag(r1) W,       b' = b - (s * r2) @ W

x' = (x + s r2) / r1 then satisfies round(x' / s~) + z~ = round(x / s) + z exactly, and
x' W' + b' = x W + b: the FP function is unchanged and the quantized one is the
per-channel one. I&S-ViT keeps z~ = mean z_c unrounded (`reparam_round_zero=False`, the
default): r2 is then not an integer and the per-tensor quantizer's grid is shifted by the
fractional part, which it carries as a non-integer zero point; rounding z~ (True) makes
the folded quantizer equal the per-channel one exactly. A layer without a bias (Swin's patch-merging reduction) cannot absorb
the zero-point shift, so there only the scales are folded (r2 = 0) and the quantizer keeps
its per-channel integer zero points z_c with the one scale s~: round(x' / s~) + z_c =
round(x / s) + z exactly. Integer kernels take per-channel zero points for free (their
sum against W is a constant int32 term of the accumulator), so this is as deployable as
a per-tensor quantizer and loses nothing; a union range over the folded channels would
widen the grid by the spread of z_c (a few of the 8 levels at 3 bits).
"""
from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp
import ml_collections

from spdfq_jax.quant import quantizers as Q

# point path suffix -> (LayerNorm, next linear layer), both relative to the point's scope.
FOLDS = {
    "attn/qkv_in": ("norm1", "attn/qkv"),
    "mlp/fc1_in": ("norm2", "mlp/fc1"),
    "reduction_in": ("norm", "reduction"),
}


def _flat(tree: Any) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _unflat(flat: dict) -> dict:
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def fold_targets(qstate: dict) -> list[tuple[str, str, str]]:
  """(point, layernorm, linear) paths of every per-channel post-LN point in qstate."""
  out = []
  for key, value in _flat(qstate).items():
    if not key.endswith("/scale") or jnp.ndim(value) != 1:
      continue
    point = key[:-len("/scale")]
    for suffix, (ln, linear) in FOLDS.items():
      if point == suffix or point.endswith("/" + suffix):
        scope = point[:-len(suffix)]
        out.append((point, scope + ln, scope + linear))
  return out


def reparameterize(params: Any, qstate: dict, cfg: ml_collections.ConfigDict
                   ) -> tuple[dict, dict]:
  """(params', qstate') with every per-channel post-LN quantizer made per tensor."""
  p, q = _flat(params), _flat(qstate)
  qmin, qmax = Q.qrange(cfg.acts.bits, cfg.acts.symmetric)
  for point, ln, linear in fold_targets(qstate):
    s, z = q[point + "/scale"], q[point + "/zero"]
    s_t = jnp.mean(s)
    z_t = jnp.mean(z)
    if cfg.reparam_round_zero:
      z_t = jnp.clip(jnp.round(z_t), qmin, qmax)
    r1 = s / s_t
    w = p[linear + "/kernel"]
    has_bias = linear + "/bias" in p
    r2 = (z - z_t) if has_bias else jnp.zeros_like(z)
    p[ln + "/scale"] = p[ln + "/scale"] / r1
    p[ln + "/bias"] = (p[ln + "/bias"] + s * r2) / r1
    p[linear + "/kernel"] = w * r1[:, None]
    if has_bias:
      p[linear + "/bias"] = p[linear + "/bias"] - (s * r2) @ w
      q[point + "/scale"], q[point + "/zero"] = s_t, z_t
    else:
      q[point + "/scale"] = s_t
  return _unflat(p), _unflat(q)
