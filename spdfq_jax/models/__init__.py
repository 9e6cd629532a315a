"""Flax ViT/DeiT/Swin, their registry, and checkpoint loading (`load`)."""
from spdfq_jax.models.convert import load

__all__ = ["load"]
