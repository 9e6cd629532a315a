"""Calibration-image synthesis against the FP model: noise, inversion, PSAQ-ViT, SPDFQ, SMI,
MimiQ."""
from spdfq_jax.synth.config import METHODS, default_config
from spdfq_jax.synth.generate import check_config, generate
from spdfq_jax.synth.layout import model_info
from spdfq_jax.synth.result import SynthResult, load_result

__all__ = ["METHODS", "SynthResult", "check_config", "default_config", "generate",
           "load_result", "model_info"]
