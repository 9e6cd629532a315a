"""Architectures from a one-line spec and from a checkpoint's tensor shapes.

A spec is `family[:key=value,...]`, where family is `vit` (or `deit`), `swin`, or a
registry name whose sizes the keys then override:

  vit:img_size=32,patch_size=4,width=64,depth=8,num_heads=4
  swin:img_size=224,embed_dim=96,depths=[2,2,6,2],num_heads=[3,6,12,24]
  deit_small_patch16_224:img_size=384

Keys are the fields of `zoo.custom_vit` / `zoo.custom_swin`. Keys a spec leaves out are
read from the checkpoint where its shapes determine them (`infer`): patch size, width,
depth, MLP ratio, classes, distillation token and the ViT input size (from the
position table); a Swin's heads and window (from its relative position tables). A
timm ViT's heads cannot be read (qkv is one (3 width, width) matrix whatever the split),
nor in general a Swin's input size: those must be given.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import re
from typing import Any, Mapping, Optional

from spdfq_jax.models import zoo

FAMILIES = {"vit": "vit", "deit": "vit", "swin": "swin"}
_TUPLES = ("depths", "num_heads")  # Swin fields that take one value per stage


def fields(family: str) -> tuple[str, ...]:
  """The keys a spec of this family may set."""
  cls = zoo.SwinTransformer if family == "swin" else zoo.VisionTransformer
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in zoo.NOT_ARCHITECTURE)


def is_spec(text: str) -> bool:
  """Whether a model name is a spec ('vit', 'swin:...', 'deit_small_patch16_224:...')."""
  head = text.partition(":")[0].strip().lower()
  return head in FAMILIES or (":" in text and head in zoo.REGISTRY)


def parse(spec: str) -> tuple[str, dict[str, Any]]:
  """'vit:width=64,depth=8' -> ('vit', {'width': 64, 'depth': 8}); a registry name before
  the colon contributes its own sizes, which the keys override."""
  head, _, rest = spec.strip().partition(":")
  head = head.strip()
  if head in zoo.REGISTRY:
    entry = zoo.entry(head)
    family, base = entry.family, dict(entry.kwargs)
  elif head.lower() in FAMILIES:
    family, base = FAMILIES[head.lower()], {}
  else:
    raise ValueError(
        f"architecture {spec!r}: {head!r} is neither a family (vit, deit, swin) nor a registry "
        f"name ({', '.join(zoo.names())}); e.g. "
        "'vit:img_size=32,patch_size=4,width=64,depth=8,num_heads=4'")
  given = parse_items(rest, fields(family), f"architecture {spec!r}: {family}")
  for key, value in given.items():
    if not _fits(_default(family, key), value):
      raise ValueError(f"architecture {spec!r}: {key}={value!r} should be like "
                       f"{_default(family, key)!r}")
  return family, {**base, **given}


def _default(family: str, key: str) -> Any:
  cls = zoo.SwinTransformer if family == "swin" else zoo.VisionTransformer
  return {f.name: f.default for f in dataclasses.fields(cls)}[key]


def _fits(default: Any, value: Any) -> bool:
  """Whether `value` has the kind of the field's default (int, float, bool, int tuple)."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, tuple):
    return isinstance(value, tuple) and all(isinstance(v, int) for v in value)
  return True


def parse_items(text: str, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
  """'a=1,b=[2,3],c=true' -> {'a': 1, 'b': (2, 3), 'c': True}, keys checked against
  `allowed`; `what` starts the error messages."""
  out = {}
  for item in _split(text):
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or not key:
      raise ValueError(f"{what}: {item!r} is not key=value")
    if key not in allowed:
      close = difflib.get_close_matches(key, allowed, n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      raise ValueError(f"{what} has no field {key!r}{hint}; fields: {', '.join(allowed)}")
    out[key] = _value(value.strip(), key, what)
  return out


def _split(text: str) -> list[str]:
  """Comma-separated items, commas inside [...] or (...) kept."""
  items, depth, cur = [], 0, ""
  for ch in text:
    depth += ch in "[("
    depth -= ch in "])"
    if ch == "," and depth == 0:
      items.append(cur)
      cur = ""
    else:
      cur += ch
  items.append(cur)
  return [i.strip() for i in items if i.strip()]


def _value(text: str, key: str, what: str) -> Any:
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if re.fullmatch(r"[A-Za-z_]\w*", text):
      return text  # a bare word (e.g. interpolation=bicubic)
    raise ValueError(f"{what}: {key}={text!r} is not a number, a bool or a list such as "
                     "[2,2,6,2]") from None
  return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- inference


def family_of_keys(keys: Any) -> Optional[str]:
  """'swin' for layers_i/..., 'vit' for blocks_i/... or a position table; None otherwise."""
  keys = list(keys)
  if any(k.startswith("layers_") for k in keys):
    return "swin"
  if any(k.startswith("blocks_") for k in keys) or "pos_embed" in keys:
    return "vit"
  return None


def infer(shapes: Mapping[str, tuple[int, ...]], hints: Optional[Mapping[str, Any]] = None
          ) -> tuple[Optional[str], dict[str, Any], list[str]]:
  """(family, the fields the shapes determine, the required fields they do not).

  `shapes`: '/'-joined param path (our layout) -> shape. `hints`: fields known from
  elsewhere (an AugReg .npz keeps the heads axis), used where the shapes are silent.
  """
  hints = dict(hints or {})
  family = family_of_keys(shapes)
  if family == "vit":
    kw, missing = _infer_vit(shapes)
  elif family == "swin":
    kw, missing = _infer_swin(shapes)
  else:
    return None, {}, []
  kw.update(hints)
  return family, kw, [m for m in missing if m not in kw]


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
  ids = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
  return max(ids) + 1 if ids else 0


def _infer_vit(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
  kw: dict[str, Any] = {}
  kernel = shapes.get("patch_embed/kernel", shapes.get("patch_embed/proj/kernel"))
  if kernel is not None and len(kernel) == 4:
    kw["patch_size"], kw["width"] = kernel[0], kernel[3]
  kw["depth"] = _count(shapes, r"blocks_(\d+)/")
  kw["distilled"] = "dist_token" in shapes
  fc1 = shapes.get("blocks_0/mlp/fc1/kernel")
  if fc1 is not None and "width" in kw:
    kw["mlp_ratio"] = fc1[1] / kw["width"]
  if "head/kernel" in shapes:
    kw["num_classes"] = shapes["head/kernel"][-1]
  missing = ["num_heads"]
  pos = shapes.get("pos_embed")
  if pos is not None and "patch_size" in kw:
    grid = pos[1] - (2 if kw["distilled"] else 1)
    side = math.isqrt(max(grid, 0))
    if side * side == grid:
      kw["img_size"] = side * kw["patch_size"]
    else:
      missing.append("img_size")
  else:
    missing.append("img_size")
  return kw, missing


def _infer_swin(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
  kw: dict[str, Any] = {}
  kernel = shapes.get("patch_embed/proj/kernel")
  if kernel is not None and len(kernel) == 4:
    kw["patch_size"], kw["embed_dim"] = kernel[0], kernel[3]
  stages = _count(shapes, r"layers_(\d+)/")
  kw["depths"] = tuple(_count(shapes, rf"layers_{i}/blocks_(\d+)/") for i in range(stages))
  tables = [shapes.get(f"layers_{i}/blocks_0/attn/relative_position_bias_table")
            for i in range(stages)]
  missing = ["img_size"]
  if stages and all(t is not None for t in tables):
    kw["num_heads"] = tuple(t[1] for t in tables)
    sides = [(math.isqrt(t[0]) + 1) // 2 for t in tables]  # (2 ws - 1)^2 rows
    kw["window_size"] = sides[0]
    # A window larger than a stage's feature map shrinks to it: the first stage whose
    # window is smaller than stage 0's gives that stage's resolution, hence the input size.
    shrunk = next((i for i, s in enumerate(sides) if s < sides[0]), None)
    if shrunk is not None and "patch_size" in kw:
      kw["img_size"] = sides[shrunk] * 2 ** shrunk * kw["patch_size"]
      missing = []
  else:
    missing.append("num_heads")
  fc1 = shapes.get("layers_0/blocks_0/mlp/fc1/kernel")
  if fc1 is not None and "embed_dim" in kw:
    kw["mlp_ratio"] = fc1[1] / kw["embed_dim"]
  if "head/kernel" in shapes:
    kw["num_classes"] = shapes["head/kernel"][-1]
  return kw, missing


# ----------------------------------------------------------------------------- building


def to_spec(family: str, kwargs: Mapping[str, Any]) -> str:
  """The spec string of an architecture: fields in the module's order, defaults left out."""
  cls = zoo.SwinTransformer if family == "swin" else zoo.VisionTransformer
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}

  def fmt(v):
    if isinstance(v, (tuple, list)):
      return "[" + ",".join(str(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)

  def is_default(k, v):
    d = defaults.get(k, dataclasses.MISSING)
    return d is not dataclasses.MISSING and not isinstance(v, str) and (
        tuple(v) == tuple(d) if isinstance(v, (tuple, list)) else v == d)

  order = [k for k in fields(family) if k in kwargs and not is_default(k, kwargs[k])]
  return family + ":" + ",".join(f"{k}={fmt(kwargs[k])}" for k in order)


def module_spec(module: zoo.Model) -> str:
  family = zoo.family(module)
  return to_spec(family, {k: getattr(module, k) for k in fields(family)})


def problems(module: zoo.Model) -> list[str]:
  """What makes an architecture unbuildable: sizes that do not divide."""
  out = []
  img, patch = module.img_size, module.patch_size
  if patch < 1 or img < patch:
    return [f"img_size {img} is smaller than patch_size {patch}"]
  if img % patch:
    out.append(f"img_size {img} is not a multiple of patch_size {patch} "
               f"(e.g. img_size={img // patch * patch} or {(img // patch + 1) * patch})")
  if isinstance(module, zoo.VisionTransformer):
    if module.num_heads < 1 or module.width % module.num_heads:
      out.append(f"width {module.width} is not a multiple of num_heads {module.num_heads}")
    return out
  depths, heads = tuple(module.depths), tuple(module.num_heads)
  if len(depths) != len(heads):
    out.append(f"depths {list(depths)} and num_heads {list(heads)} differ in length")
  res = img // patch
  for i, h in enumerate(heads):
    r, dim = res // 2 ** i, module.embed_dim * 2 ** i
    if i and (res // 2 ** (i - 1)) % 2:
      out.append(f"stage {i} merges 2x2 patches of a {res // 2 ** (i - 1)}-wide map (odd): "
                 f"img_size / patch_size must be divisible by {2 ** (len(heads) - 1)}")
      break
    if r > module.window_size and r % module.window_size:
      out.append(f"stage {i} map of {r} is not a multiple of window_size {module.window_size}")
    if h < 1 or dim % h:
      out.append(f"stage {i} width {dim} is not a multiple of its {h} heads")
  return out


def check(module: zoo.Model) -> zoo.Model:
  """Raises one ValueError naming every size that does not fit; returns the module."""
  found = problems(module)
  if found:
    raise ValueError(f"architecture {module_spec(module)} cannot be built: "
                     + "; ".join(found) + ".")
  return module


def build(family: str, kwargs: Mapping[str, Any]) -> zoo.Model:
  """A checked module of `family` with these fields."""
  kwargs = {k: tuple(v) if k in _TUPLES and isinstance(v, (list, tuple)) else v
            for k, v in kwargs.items()}
  cls = zoo.custom_swin if family == "swin" else zoo.custom_vit
  return check(cls(**kwargs))


def resolve(spec: Optional[str], shapes: Mapping[str, tuple[int, ...]],
            hints: Optional[Mapping[str, Any]] = None, source: str = "the checkpoint"
            ) -> zoo.Model:
  """The module for a checkpoint: the spec's fields, the rest read from its shapes.

  Fails naming the fields neither gives, with the spec to complete.
  """
  family, given = parse(spec) if spec else (None, {})
  found, inferred, missing = infer(shapes, hints)
  if found is None and family is None:
    raise ValueError(f"{source}: no ViT (blocks_i) or Swin (layers_i) parameters found, so its "
                     "architecture cannot be read; is it a ViT/DeiT/Swin checkpoint?")
  if family is not None and found is not None and family != found:
    names = {"vit": "ViT", "swin": "Swin"}
    raise ValueError(f"{source} holds a {names[found]} ({to_spec(found, inferred)}), not a "
                     f"{names[family]}: fix the architecture.")
  family = family or found
  kwargs = {**inferred, **given}
  missing = [m for m in missing if m not in kwargs]
  if missing:
    why = {"num_heads": "a timm qkv matrix is (3 x width, width) however the heads split it",
           "img_size": ("a Swin has no position table, and its windows fit many sizes"
                        if family == "swin" else "its position table is not a square grid")}
    reasons = "; ".join(f"{m}: {why.get(m, 'not in the shapes')}" for m in missing)
    filled = dict(kwargs, **{m: "?" for m in missing})
    hint = ""
    if "num_heads" in missing and family == "vit" and kwargs.get("width", 0) >= 192:
      hint = f" (timm's ViT/DeiT sizes have 64 channels a head: {kwargs['width'] // 64} here)"
    raise ValueError(
        f"{source}: {' and '.join(missing)} cannot be read from the checkpoint's shapes "
        f"({reasons}). Give {'them' if len(missing) > 1 else 'it'} in the architecture, "
        f"e.g. '{to_spec(family, filled)}'{hint}.")
  return build(family, kwargs)
