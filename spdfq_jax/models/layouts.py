"""State-dict layouts of other code -> our nested params (numpy arrays): timm's (and the
original DeiT / Swin repositories' .pth), and Google's AugReg / big_vision ViT .npz.
Reading the files and checking the result against a module are convert.py's."""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

import flax
import numpy as np

# Keys that timm / the original repos store but our modules recompute.
_BUFFERS = ("relative_position_index", "attn_mask")
# Wrappers around the state dict in training checkpoints (DeiT, Swin: 'model').
_NESTING = ("model", "state_dict", "model_ema", "state_dict_ema")

Params = dict[str, Any]


def unnest(sd: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict inside a training checkpoint ({'model': sd, ...}), 'module.' stripped."""
  for key in _NESTING:
    if key in sd and isinstance(sd[key], Mapping):
      sd = sd[key]
      break
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


# ----------------------------------------------------------------------------- timm / torch
def _set(tree: dict, path: Iterable[str], value: Any) -> None:
  *parents, leaf = path
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def timm_key_to_path(key: str, family: str) -> list[str]:
  """'blocks.3.attn.qkv.weight' -> ['blocks_3', 'attn', 'qkv', 'weight'] (leaf renamed later)."""
  parts, out, i = key.split("."), [], 0
  while i < len(parts):
    if parts[i] in ("blocks", "layers") and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  if family == "vit" and out[:2] == ["patch_embed", "proj"]:
    out = ["patch_embed"] + out[2:]  # our ViT patch embedding is the conv itself
  if out[:2] == ["head", "fc"]:
    out = ["head"] + out[2:]  # timm >= 0.9 Swin wraps the classifier in a ClassifierHead
  return out


def timm_value(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """torch layouts -> Flax: Linear (out, in) -> kernel (in, out), conv OIHW -> HWIO."""
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.floating):
    value = value.astype(np.float32)
  if leaf != "weight":
    return leaf, value
  if value.ndim == 2:
    return "kernel", np.ascontiguousarray(value.T)
  if value.ndim == 4:
    return "kernel", np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  return "scale", value  # LayerNorm


def original_swin_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
  """Microsoft Swin (and timm < 0.9) -> timm >= 0.9 keys.

  The original repo merges patches at the END of stage i ('layers.i.downsample'), timm
  at the START of stage i + 1; the classifier is 'head' rather than 'head.fc'.
  """
  out = {}
  for k, v in sd.items():
    k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
    out[k] = v
  return out


def timm_to_flax(sd: Mapping[str, np.ndarray], family: str) -> Params:
  """A timm-style state dict (any of the supported layouts) -> our nested params."""
  sd = unnest(sd)
  if family == "swin" and "layers.0.downsample.reduction.weight" in sd:
    sd = original_swin_keys(sd)
  params: Params = {}
  for key, value in sd.items():
    if any(b in key for b in _BUFFERS):
      continue
    *path, leaf = timm_key_to_path(key, family)
    leaf, value = timm_value(leaf, value)
    _set(params, path + [leaf], value)
  return params


def vit_to_timm(params: Params) -> dict[str, np.ndarray]:
  """Our ViT params -> timm's VisionTransformer state dict (the inverse of `timm_to_flax`
  for a ViT): files timm and the reference code read."""
  out = {}
  for path, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    path, v = list(path), np.asarray(v)
    if path[0] == "patch_embed":
      path = ["patch_embed", "proj"] + path[1:]
    key = ".".join(p.replace("blocks_", "blocks.") for p in path[:-1])
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    if path[-1] == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    out[f"{key}.{leaf}" if key else leaf] = np.ascontiguousarray(v)
  return out


# ----------------------------------------------------------------------------- AugReg .npz
def _npz_prefix(w: Mapping[str, Any]) -> str:
  for prefix in ("", "opt/target/", "params/"):
    if f"{prefix}embedding/kernel" in w:
      return prefix
  raise ValueError("not a ViT .npz checkpoint: no 'embedding/kernel' (with prefix '', "
                   "'opt/target/' or 'params/').")


def augreg_to_flax(w: Mapping[str, np.ndarray]) -> tuple[Params, list[str]]:
  """Google ViT .npz (vit_jax layout, or big_vision's) -> (our params, unused npz keys).

  vit_jax: Transformer/encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}, pos_embedding with the class token row. big_vision
  ('params/' prefix): {LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0}, pos_embedding without that row (the class token gets none), and blocks
  optionally stacked under Transformer/encoderblock (scan).
  """
  prefix = _npz_prefix(w)
  big_vision = (prefix == "params/" or f"{prefix}pos_embedding" in w
                or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w)
  mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision \
      else ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
  used: set[str] = set()

  def take(key: str, idx: Optional[int] = None) -> Optional[np.ndarray]:
    if prefix + key not in w:
      return None
    used.add(prefix + key)
    v = np.asarray(w[prefix + key], np.float32)
    return v if idx is None else v[idx]

  p: Params = {}

  def put(path: str, value: Optional[np.ndarray]) -> None:
    if value is not None:
      _set(p, path.split("/"), value)

  put("patch_embed/kernel", take("embedding/kernel"))
  put("patch_embed/bias", take("embedding/bias"))
  put("cls_token", take("cls"))
  pos = take("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding")
  if pos is not None:
    pos = pos.reshape(1, -1, pos.shape[-1])
    if int(np.sqrt(pos.shape[1])) ** 2 == pos.shape[1]:  # grid only: give the class token 0
      pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    put("pos_embed", pos)
  put("norm/scale", take("Transformer/encoder_norm/scale"))
  put("norm/bias", take("Transformer/encoder_norm/bias"))
  put("head/kernel", take("head/kernel"))
  put("head/bias", take("head/bias"))

  scan = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
  if scan:
    depth = w[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
  else:
    ids = [int(m.group(1)) for k in w if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", k))]
    depth = max(ids) + 1 if ids else 0
  for i in range(depth):
    src = "Transformer/encoderblock/" if scan else f"Transformer/encoderblock_{i}/"
    idx = i if scan else None
    t = lambda k: take(src + k, idx)  # noqa: E731
    dst = f"blocks_{i}/"
    for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", ln2)):
      put(dst + ours + "/scale", t(theirs + "/scale"))
      put(dst + ours + "/bias", t(theirs + "/bias"))
    qkv_k = [t(f"{mha}/{n}/kernel") for n in ("query", "key", "value")]
    qkv_b = [t(f"{mha}/{n}/bias") for n in ("query", "key", "value")]
    if all(x is not None for x in qkv_k):  # (D, heads, hd) each -> (D, 3D)
      put(dst + "attn/qkv/kernel", np.concatenate([x.reshape(x.shape[0], -1) for x in qkv_k], 1))
    if all(x is not None for x in qkv_b):
      put(dst + "attn/qkv/bias", np.concatenate([x.reshape(-1) for x in qkv_b]))
    out_k = t(f"{mha}/out/kernel")  # (heads, hd, D)
    put(dst + "attn/proj/kernel", None if out_k is None else out_k.reshape(-1, out_k.shape[-1]))
    put(dst + "attn/proj/bias", t(f"{mha}/out/bias"))
    for j, fc in enumerate(("fc1", "fc2")):
      put(dst + f"mlp/{fc}/kernel", t(f"{mlp}/Dense_{j}/kernel"))
      put(dst + f"mlp/{fc}/bias", t(f"{mlp}/Dense_{j}/bias"))
  unused = sorted(k for k in w if k.startswith(prefix) and k not in used)
  return p, unused


def augreg_hints(w: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Fields an AugReg .npz keeps that our layout loses: the heads axis of the query kernel,
  (D, heads, head_dim), or (depth, D, heads, head_dim) when the blocks are scanned."""
  for k, v in w.items():
    if re.search(r"MultiHeadDotProductAttention_\d/query/kernel$", k) and np.ndim(v) >= 3:
      return {"num_heads": int(np.shape(v)[-2])}
  return {}
