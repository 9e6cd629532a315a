"""Checkpoints -> (Flax module, params): timm, original DeiT / Swin, Google AugReg, ours.

Every format is first turned into a nested dict of numpy arrays in our layout, then
checked against the module's expected param tree, so that a wrong file fails once,
with every missing, unused and misshaped key listed, instead of deep inside `apply`.
Nothing here touches the network: weights come from local files only.
"""
from __future__ import annotations

import difflib
import json
import os
import zipfile
from typing import Any, Iterable, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spdfq_jax.models import arch, native, zoo
from spdfq_jax.models.layouts import Params, augreg_hints, augreg_to_flax, timm_to_flax, unnest

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
ASSETS = ("fmnist_vit", "fmnist_swin", "scenes_vit")  # built-in small models (native format)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
MAX_LISTED = 12  # keys listed per kind of mismatch; the counts are always complete

NameOrModule = Union[str, zoo.Model]


# ----------------------------------------------------------------------------- reading files
def safetensors_problem(path: str) -> Optional[str]:
  """Why a .safetensors file cannot be read (truncated, corrupt), or None: checked from the
  header and the file size alone, before any tensor is read."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      return f"it has {size} bytes, fewer than a .safetensors header: empty or truncated"
    n = int.from_bytes(head, "little")
    if n > size - 8:
      return (f"its header claims {n} bytes but only {size - 8} follow: truncated, or not "
              "a .safetensors file")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
      return "its header is not JSON: corrupt, or not a .safetensors file"
  if not isinstance(header, dict):
    return "its header is not a JSON object: corrupt, or not a .safetensors file"
  need = max((v["data_offsets"][1] for k, v in header.items()
              if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
  have = size - 8 - n
  if need > have:
    return f"truncated: its tensors need {need} bytes after the header, {have} are there"
  return None


def check_file(path: str) -> None:
  """Raises one ValueError for a truncated or corrupt .safetensors file."""
  if path.endswith(".safetensors"):
    problem = safetensors_problem(path)
    if problem:
      raise ValueError(f"{path} cannot be read: {problem}. Download or write it again.")


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of a .npz, or one ValueError naming the file when it is damaged."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return dict(f)
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read as .npz ({e}): truncated or corrupt. "
                     "Download it again.") from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy (float32 for bf16, which numpy lacks)."""
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except Exception:  # e.g. bf16, which safetensors.numpy refuses: read the raw bytes instead
    return _read_safetensors_raw(path)


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
  import json
  import ml_dtypes
  dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
            "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for k, info in header.items():
    if k == "__metadata__":
      continue
    lo, hi = info["data_offsets"]
    arr = np.frombuffer(data[lo:hi], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    out[k] = arr.astype(np.float32) if info["dtype"] == "BF16" else arr.copy()
  return out


def read_torch(path: str) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint's state dict as numpy; needs torch, imported only here."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"Reading {path} (a PyTorch checkpoint) needs torch: `pip install -e .[parity]` "
        "(or `pip install torch`), or convert the file to .safetensors first.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickles with arbitrary objects are refused on purpose
    raise ValueError(f"{path}: torch.load(weights_only=True) failed ({e}). Re-save only the "
                     "state dict (torch.save(sd, path)) or convert it to .safetensors.") from e
  sd = unnest(obj)
  out = {}
  for k, v in sd.items():
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out


# ----------------------------------------------------------------------------- checking
def input_channels(flat_params: dict) -> int:
  """Image channels a checkpoint was trained on (its patch-embedding kernel's input axis);
  3 when it has none."""
  for key in ("patch_embed/kernel", "patch_embed/proj/kernel"):
    if key in flat_params and np.ndim(flat_params[key]) == 4:
      return int(np.shape(flat_params[key])[2])
  return 3


def expected_shapes(module: nn.Module, channels: int = 3) -> dict[str, tuple[int, ...]]:
  """'/'-joined param path -> shape, from an abstract init (no memory, no compute)."""
  size = module.img_size
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  tree = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def check(module: nn.Module, params: Params, unused: Iterable[str] = (), source: str = "") -> None:
  """Raises one ValueError listing every missing, unused and wrongly shaped key."""
  got = flax.traverse_util.flatten_dict(params, sep="/")
  want = expected_shapes(module, input_channels(got))
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want)) + list(unused)
  wrong = [f"{k}: checkpoint {tuple(np.shape(got[k]))}, model {want[k]}"
           for k in sorted(set(want) & set(got)) if tuple(np.shape(got[k])) != want[k]]
  if not (missing or extra or wrong):
    return
  lines = [f"Checkpoint {source or ''} does not match {type(module).__name__} "
           f"({len(missing)} missing, {len(extra)} unused, {len(wrong)} wrongly shaped):"]
  lines += _architecture_note(module, {k: tuple(np.shape(v)) for k, v in got.items()})
  for title, items in (("missing", missing), ("unused", extra), ("wrong shape", wrong)):
    lines += [f"  {title}: {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
      lines.append(f"  ... and {len(items) - MAX_LISTED} more {title}")
  raise ValueError("\n".join(lines))


def _architecture_note(module: zoo.Model, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
  """One line saying how the file's architecture differs from the model's, when it does."""
  family, found, _ = arch.infer(shapes)
  if family is None:
    return []
  want = zoo.family(module)
  if family != want:
    return [f"  The file holds a {'Swin' if family == 'swin' else 'ViT'} "
            f"({arch.to_spec(family, found)}), the model is {arch.module_spec(module)}."]
  diff = [f"{k}={v} (model {getattr(module, k)})" for k, v in found.items()
          if tuple(np.atleast_1d(v)) != tuple(np.atleast_1d(getattr(module, k)))]
  if not diff:
    return []
  return [f"  It is another architecture: the file has {', '.join(diff)}. Load it with its "
          f"own ({arch.to_spec(family, found)}, plus what the shapes do not give)."]


def num_classes_of(params: Params) -> Optional[int]:
  head = params.get("head", {})
  return int(head["kernel"].shape[-1]) if "kernel" in head else None


# ----------------------------------------------------------------------------- entry point
def _base_module(name: Optional[NameOrModule]) -> Optional[zoo.Model]:
  if isinstance(name, nn.Module):
    return name
  if name in zoo.REGISTRY:
    return zoo.build(name)
  return None


def unknown_model_message(name: str) -> str:
  close = difflib.get_close_matches(name, zoo.names() + list(ASSETS), n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return (f"Unknown model {name!r}.{hint} Known models: {', '.join(zoo.names())}; "
          f"built-in assets: {', '.join(ASSETS)}; or an architecture such as "
          "'vit:num_heads=4' (models.arch), or a module (zoo.custom_vit(...)).")


def resolve(name: Optional[NameOrModule], path: Optional[str]) -> str:
  """The file to read: `path`, or the built-in asset file of `name`."""
  if (isinstance(name, str) and name not in zoo.REGISTRY and name not in ASSETS
      and not arch.is_spec(name)):
    raise ValueError(unknown_model_message(name))
  if path is None and (not name or (isinstance(name, str) and arch.is_spec(name))):
    raise FileNotFoundError("No checkpoint path: an architecture alone has no weights; pass "
                            "the checkpoint file.")
  if path is None:
    if isinstance(name, str) and name in ASSETS:
      path = os.path.join(ASSET_DIR, f"{name}.safetensors")
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"Built-in asset {name!r} is missing: expected {path} (a spdfq_jax .safetensors "
            "written by spdfq_jax.models.native.save). Train or copy it there first.")
      return path
    tag = zoo.entry(name).checkpoint_tag if isinstance(name, str) else "the matching timm model"
    raise FileNotFoundError(
        f"No checkpoint path for {name!r}: nothing is downloaded at run time. Get "
        f"{tag} (e.g. model.safetensors from huggingface.co/timm/{tag}) and pass its path.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint not found: {path}")
  return path


def load(name: Optional[NameOrModule] = None, path: Optional[str] = None, **overrides: Any
         ) -> tuple[zoo.Model, Params]:
  """(module, params) for a registry name, a built-in asset, a module, an architecture
  spec or nothing.

  `path`: timm .safetensors; timm / original DeiT / original Swin .pth (needs torch);
  Google AugReg .npz (ViT); or our own .safetensors, whose metadata rebuilds the module
  whatever `name` says. For other files the architecture is `name`'s, or, for a spec
  ('vit:num_heads=4', see `models.arch`) or None, read from the file's shapes where they
  determine it. num_classes comes from the checkpoint's head; `overrides` (e.g. point)
  are applied last. Params are float32 numpy arrays in the module's layout.
  """
  path = resolve(name, path)
  check_file(path)
  if path.endswith(".safetensors") and native.read_metadata(path) is not None:
    module, params, _ = native.load(path)
    return _finish(module, params, [], path, overrides, infer_classes=False)
  if isinstance(name, str) and name in ASSETS:
    raise ValueError(f"{path} is not a spdfq_jax checkpoint, which built-in asset {name!r} must be.")
  base = _base_module(name)
  raw = read_raw(path)
  if base is not None:
    family = zoo.family(base)
  elif name:
    family = arch.parse(name)[0]
  else:
    family = raw_family(raw, path)
  params, unused, hints = to_params(raw, path, family, name)
  if base is None:
    shapes = {k: tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(
        params, sep="/").items()}
    base = arch.resolve(name or None, shapes, hints, source=path)
  return _finish(base, params, unused, path, overrides, infer_classes=True)


def read_raw(path: str) -> Mapping[str, np.ndarray]:
  """A foreign checkpoint's tensors as stored (state dict or .npz arrays)."""
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return read_torch(path)
  if path.endswith(".npz"):
    return read_npz(path)
  raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors, "
                   f"{'/'.join(TORCH_SUFFIXES)} or .npz.")


def raw_family(raw: Mapping[str, Any], path: str) -> str:
  """'swin' when a state dict has Swin stages (layers.i), else 'vit' (and for every .npz)."""
  if path.endswith(".npz"):
    return "vit"
  return "swin" if any(k.startswith("layers.") for k in unnest(raw)) else "vit"


def to_params(raw: Mapping[str, np.ndarray], path: str, family: str,
              name: Optional[NameOrModule] = None) -> tuple[Params, list[str], dict]:
  """(our params, unused source keys, architecture hints) of a foreign checkpoint."""
  if not path.endswith(".npz"):
    return timm_to_flax(raw, family), [], {}
  if family != "vit":
    raise ValueError(f"{path}: .npz checkpoints are Google ViTs; {name!r} is a Swin.")
  params, unused = augreg_to_flax(raw)
  return params, unused, augreg_hints(raw)


def _finish(module: zoo.Model, params: Params, unused: list[str], path: str,
            overrides: Mapping[str, Any], infer_classes: bool) -> tuple[zoo.Model, Params]:
  classes = num_classes_of(params)
  if infer_classes and classes is not None and "num_classes" not in overrides:
    module = module.clone(num_classes=classes)
  if overrides:
    module = module.clone(**overrides)
  arch.check(module)
  check(module, params, unused, source=path)
  return module, params


def load_state_dict(module: zoo.Model, sd: Mapping[str, np.ndarray]) -> tuple[zoo.Model, Params]:
  """(module, params) from an in-memory timm-style state dict (numpy values)."""
  family = zoo.family(module)
  return _finish(module, timm_to_flax(sd, family), [], "<state dict>", {}, infer_classes=True)
