"""Model registry: timm names -> architecture and evaluation preprocessing.

`build(name, **overrides)` returns an unbound Flax module; `custom_vit`/`custom_swin`
build any size (used for the Fashion-MNIST test bed and for small test models).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import flax.linen as nn

from spdfq_jax.models.swin import SwinTransformer, swin_units
from spdfq_jax.models.vit import VisionTransformer, vit_units

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

Model = Union[VisionTransformer, SwinTransformer]
# Module fields that are not the architecture: the quant-point factory, Flax's own, and how
# the model runs (rematerialisation, matmul operand type). Checkpoints and specs skip them.
NOT_ARCHITECTURE = ("point", "parent", "name", "remat", "matmul_dtype")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Evaluation transform: bicubic resize to floor(size / crop_pct), centre crop, normalise."""
  input_size: int = 224
  crop_pct: float = 0.875
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  interpolation: str = "bicubic"


@dataclasses.dataclass(frozen=True)
class Entry:
  family: str  # 'vit' | 'swin'
  kwargs: dict
  preprocessing: Preprocessing
  checkpoint_tag: str  # what a user downloads (timm hub tag)


def _vit(width, depth, heads, **kw) -> dict:
  return dict(width=width, depth=depth, num_heads=heads, patch_size=16, img_size=224, **kw)


def _swin(dim, depths, heads) -> dict:
  return dict(embed_dim=dim, depths=depths, num_heads=heads, patch_size=4, window_size=7, img_size=224)


_VIT_PRE = Preprocessing(crop_pct=0.9, mean=HALF, std=HALF)
_DEIT_PRE = Preprocessing(crop_pct=0.875)
_SWIN_PRE = Preprocessing(crop_pct=0.9)
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
_SWIN_SIZES = {"tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
               "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
               "base": (128, (2, 2, 18, 2), (4, 8, 16, 32))}

REGISTRY: dict[str, Entry] = {}
for _size, (_w, _d, _h) in _SIZES.items():
  REGISTRY[f"vit_{_size}_patch16_224"] = Entry(
      "vit", _vit(_w, _d, _h), _VIT_PRE, f"vit_{_size}_patch16_224.augreg_in21k_ft_in1k")
  REGISTRY[f"deit_{_size}_patch16_224"] = Entry(
      "vit", _vit(_w, _d, _h), _DEIT_PRE, f"deit_{_size}_patch16_224.fb_in1k")
  REGISTRY[f"deit_{_size}_distilled_patch16_224"] = Entry(
      "vit", _vit(_w, _d, _h, distilled=True), _DEIT_PRE,
      f"deit_{_size}_distilled_patch16_224.fb_in1k")
for _size, (_dim, _depths, _heads) in _SWIN_SIZES.items():
  REGISTRY[f"swin_{_size}_patch4_window7_224"] = Entry(
      "swin", _swin(_dim, _depths, _heads), _SWIN_PRE,
      f"swin_{_size}_patch4_window7_224." + ("ms_in22k_ft_in1k" if _size == "base" else "ms_in1k"))


def names() -> list[str]:
  return sorted(REGISTRY)


def entry(name: str) -> Entry:
  if name not in REGISTRY:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(names())}; "
                     "or build any size with custom_vit(...) / custom_swin(...).")
  return REGISTRY[name]


def build(name: str, **overrides: Any) -> Model:
  """Unbound module for a registry name; overrides (e.g. num_classes, point) win."""
  e = entry(name)
  cls = VisionTransformer if e.family == "vit" else SwinTransformer
  return cls(**{**e.kwargs, **overrides})


def custom_vit(**kwargs: Any) -> VisionTransformer:
  """Any ViT/DeiT size: img_size, patch_size, width, depth, num_heads, num_classes, distilled, ..."""
  return VisionTransformer(**kwargs)


def custom_swin(**kwargs: Any) -> SwinTransformer:
  """Any Swin size: img_size, patch_size, embed_dim, depths, num_heads, window_size, ..."""
  return SwinTransformer(**kwargs)


def units(model: nn.Module) -> list[tuple[str, list[tuple[str, ...]]]]:
  """Forward-order units of a model and the param subtrees each owns (for reconstruction)."""
  if isinstance(model, VisionTransformer):
    return vit_units(model)
  if isinstance(model, SwinTransformer):
    return swin_units(model)
  raise TypeError(f"not a zoo model: {type(model).__name__}")


def unit_target_method(model: nn.Module, name: str) -> str:
  """The model method whose output reconstruction matches for unit `name`: 'run_unit' (the
  unit's output), or 'unit_target' where the reference matches something else (Swin's
  `embed`: the patch convolution before its LayerNorm)."""
  return "unit_target" if family(model) == "swin" and name == "embed" else "run_unit"


def family(model: nn.Module) -> str:
  """'vit' (ViT and DeiT) or 'swin'."""
  if isinstance(model, VisionTransformer):
    return "vit"
  if isinstance(model, SwinTransformer):
    return "swin"
  raise TypeError(f"not a zoo model: {type(model).__name__}")


def patch_embed_kernel(model: nn.Module, params: Any) -> Any:
  """The patch-embedding conv kernel (HWIO): a ViT keeps it at `patch_embed`, a Swin one
  level deeper (`patch_embed/proj`, beside its LayerNorm)."""
  embed = params["patch_embed"]
  return (embed["proj"] if family(model) == "swin" else embed)["kernel"]


def in_channels(model: nn.Module, params: Any) -> int:
  """Input channels, read off the patch-embedding kernel (the module infers them)."""
  return int(patch_embed_kernel(model, params).shape[2])


def with_point(model: Model, point: Callable[..., nn.Module]) -> Model:
  """The same architecture with another quant-point factory (params unchanged)."""
  return model.clone(point=point)
