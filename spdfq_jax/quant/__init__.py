"""Quantization engine: fake quantizers, calibration, post-LN reparameterisation,
block-wise reconstruction and integer export.

  cfg = quant.default_config(4, 4)                       # or preset='calib' / 'reparam'
  qm = quant.quantize(module, params, calib_images, cfg)  # -> QuantizedModel
  logits = qm.logits(images)
  quant.export.save('model_w4a4.safetensors', qm); qm2 = quant.export.load(...)

Every stage is also callable on its own: calibrate, reparameterize, weight_state,
reconstruct, build.
"""
from spdfq_jax.quant import export
from spdfq_jax.quant import quantizers
from spdfq_jax.quant.api import quantize
from spdfq_jax.quant.calibrate import calibrate
from spdfq_jax.quant.config import PRESETS, default_config
from spdfq_jax.quant.qmodel import QuantizedModel, build, point_factory, quant_module
from spdfq_jax.quant.weights import quantize_weights, weight_state
from spdfq_jax.quant.reconstruct import reconstruct
from spdfq_jax.quant.reparam import reparameterize
