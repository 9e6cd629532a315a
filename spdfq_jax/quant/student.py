"""A trainable quantized copy of an FP model: the student of PSAQ-ViT V2's adaptive
teacher-student synthesis (synth/psaq_v2.py).

The synthesis loop takes the student as two functions and never imports this package; the
pipeline builds it here with the row's bit setting and hands it over. The student is the
"naive" quantized model of PSAQ-ViT V2 (open choice, docs/synthesis.md): min/max ranges,
weights per output channel, activations (post-softmax included) per tensor, the image
input in full precision, no reparameterisation; ranges are computed once from the images
given to `init` and then frozen, the latent weights learn through straight-through
fake quantization.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from spdfq_jax.models import zoo
from spdfq_jax.quant import config as qconfig
from spdfq_jax.quant import qmodel
from spdfq_jax.quant import weights
from spdfq_jax.quant.calibrate import calibrate


class Student(NamedTuple):
  """init(images) -> variables ({'params': latent FP weights, trained; 'quant', 'wquant':
  frozen ranges}); apply(variables, images) -> logits, differentiable in the images and in
  variables['params']."""
  init: Callable[[np.ndarray], dict]
  apply: Callable[[dict, jax.Array], jax.Array]


def student_config(w_bits: int, a_bits: int) -> ml_collections.ConfigDict:
  """The student's quantizer settings at W{w_bits}A{a_bits}."""
  return qconfig.default_config(w_bits, a_bits, "calib", w_method="minmax", a_method="minmax",
                                softmax_quantizer="uniform")


def student(module: zoo.Model, params: Any, w_bits: int, a_bits: int) -> Student:
  """The student of `module` with FP `params` at W{w_bits}A{a_bits}."""
  cfg = student_config(w_bits, a_bits)
  qmodule = qmodel.quant_module(module, cfg)
  host_params = jax.tree_util.tree_map(np.asarray, params)

  def init(images: np.ndarray) -> dict:
    qstate = calibrate(module, host_params, images, cfg)
    wstate = weights.weight_state(host_params, cfg)
    return {"params": host_params, "quant": jax.tree_util.tree_map(np.asarray, qstate),
            "wquant": jax.tree_util.tree_map(np.asarray, wstate)}

  def apply(variables: dict, images: jax.Array) -> jax.Array:
    kernels = weights.quantize_weights(variables["params"], variables["wquant"], cfg)
    return qmodule.apply({"params": kernels, "quant": variables["quant"]}, images)

  return Student(init, apply)
