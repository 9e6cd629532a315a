"""PSAQ-ViT V2's adaptive teacher-student synthesis (Li et al., TNNLS 2023, arXiv
2209.05687), built from the paper: no reference code exists (the PSAQ-ViT repository holds
V1 only), and docs/synthesis.md lists every choice the paper leaves open.

The images keep V1's loop and patch-similarity entropy, drop the class guidance, and take
turns with a quantized student under the FP teacher: each step the images move to raise
the student's disagreement with the teacher (KL(teacher || student) on the jittered
batch), then the student's latent weights take one Adam step to lower it on the updated
images. The student comes from the caller (`Student`-like: init, apply), so this package
never imports the quantization one; the pipeline builds it with the row's bit setting.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spdfq_jax.synth import losses


class StudentModel(Protocol):
  """What the loop needs of a student (quant.student.Student is one)."""
  init: Callable[[np.ndarray], dict]  # start images -> variables ({'params': trained, ...})
  apply: Callable[[dict, jax.Array], jax.Array]  # (variables, images) -> logits


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, on settings the V2 loop cannot run."""
  for field in ("v2_w_bits", "v2_a_bits"):
    if not isinstance(cfg[field], int) or not 2 <= cfg[field] <= 8:
      raise ValueError(f"synth.{field} must be the student's bits, an integer in 2..8, got "
                       f"{cfg[field]!r} (the pipeline sets the row's bits)")
  if not cfg.v2_student_lr > 0:
    raise ValueError(f"synth.v2_student_lr must be > 0, got {cfg.v2_student_lr!r}")
  if not cfg.v2_adversarial_weight >= 0:
    raise ValueError("synth.v2_adversarial_weight must be >= 0, got "
                     f"{cfg.v2_adversarial_weight!r}")
  if cfg.microbatches != 1:
    raise ValueError("synth.microbatches must be 1 for psaq_v2 (its student step reads the "
                     "whole batch); use synth.remat to save memory.")


def optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The student's optimiser: Adam at a constant `v2_student_lr` (open choice)."""
  return optax.adam(cfg.v2_student_lr)


def initial_state(student: StudentModel, cfg: ml_collections.ConfigDict,
                  x0: np.ndarray) -> dict:
  """{'variables', 'opt'}: the student calibrated on the start images (data-free: the
  noise the images start from) and its fresh optimiser state."""
  variables = student.init(np.asarray(x0, np.float32))
  return {"variables": variables, "opt": optimizer(cfg).init(variables["params"])}


def adversarial_term(teacher_logits: jax.Array, student_logits: jax.Array,
                     cfg: ml_collections.ConfigDict) -> jax.Array:
  """(B,) the images' term: minus the weighted teacher-student KL, so that lowering the
  objective raises the disagreement."""
  return -cfg.v2_adversarial_weight * losses.kl_divergence(teacher_logits, student_logits)


def student_step(apply: Callable, cfg: ml_collections.ConfigDict, state: dict,
                 teacher_logits: jax.Array, images: jax.Array, mask: jax.Array
                 ) -> tuple[dict, jax.Array]:
  """One Adam step of the student's latent weights on mean KL(teacher || student) over the
  valid images; returns (state, that KL before the step)."""
  n_valid = jnp.maximum(mask.sum(), 1.0)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  images = jax.lax.stop_gradient(images)

  def loss(params):
    logits = apply({**state["variables"], "params": params}, images)
    return (losses.kl_divergence(teacher_logits, logits) * mask).sum() / n_valid

  params = state["variables"]["params"]
  kd, grad = jax.value_and_grad(loss)(params)
  updates, opt = optimizer(cfg).update(grad, state["opt"], params)
  variables = {**state["variables"], "params": optax.apply_updates(params, updates)}
  return {"variables": variables, "opt": opt}, kd


def flat(state: dict) -> dict[str, Any]:
  """The state as {index: leaf}, the form its checkpoint stores."""
  return {str(i): leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(state))}


def unflat(like: dict, leaves: dict[str, Any]) -> dict:
  """Inverse of `flat`, shaped like `like`."""
  treedef = jax.tree_util.tree_structure(like)
  return jax.tree_util.tree_unflatten(treedef, [leaves[str(i)]
                                                for i in range(treedef.num_leaves)])


def require(student: Optional[StudentModel]) -> StudentModel:
  if student is None:
    raise ValueError("method psaq_v2 needs its quantized student: pass generate(..., "
                     "student=quant.student.student(module, params, w_bits, a_bits))")
  return student
