"""Calibration-image synthesis against the FP model: noise, inversion, PSAQ-ViT, SPDFQ."""
from spdfq_jax.synth.config import METHODS, default_config
from spdfq_jax.synth.generate import generate
from spdfq_jax.synth.layout import model_info
from spdfq_jax.synth.result import SynthResult, load_result

__all__ = ["METHODS", "SynthResult", "default_config", "generate", "load_result", "model_info"]
