"""Quantization engine: fake quantizers, calibration, reparameterisation, reconstruction, export."""
