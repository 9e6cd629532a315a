"""Checkpoint formats and the errors a wrong checkpoint gives (no torch needed)."""
from __future__ import annotations

import os
import re
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from spdfq_jax import models
from spdfq_jax.models import convert, native, zoo
from parity_util import fixture


@pytest.fixture(scope="module")
def vit():
  module, path, ref = fixture("vit")
  module, params = models.load(module, path)
  return module, params, convert.read_safetensors(path), ref


@pytest.fixture(scope="module")
def swin():
  module, path, ref = fixture("swin")
  return module, convert.read_safetensors(path), ref


def _logits(module, params, images):
  return np.asarray(module.apply({"params": params}, images))


def test_wrong_checkpoint_lists_every_problem(vit, tmp_path):
  module, _, sd, _ = vit
  sd = dict(sd)
  sd["blocks.0.attn.qkv_renamed.weight"] = sd.pop("blocks.0.attn.qkv.weight")
  del sd["norm.bias"]
  sd["blocks.1.mlp.fc1.bias"] = sd["blocks.1.mlp.fc1.bias"][:-1].copy()
  path = str(tmp_path / "bad.safetensors")
  save_file(sd, path)
  with pytest.raises(ValueError) as e:
    models.load(module, path)
  msg = str(e.value)
  for expected in ("missing: blocks_0/attn/qkv/kernel", "missing: norm/bias",
                   "unused: blocks_0/attn/qkv_renamed/kernel",
                   "wrong shape: blocks_1/mlp/fc1/bias: checkpoint (191,), model (192,)",
                   "2 missing, 1 unused, 1 wrongly shaped"):
    assert expected in msg, msg


def test_swin_checkpoint_into_vit_fails_with_listing(swin, vit):
  with pytest.raises(ValueError, match="missing: blocks_0/attn/qkv/kernel"):
    convert.load_state_dict(vit[0], swin[1])


def test_original_swin_layout(swin, tmp_path):
  """Microsoft's keys: merging at the end of stage i, 'head', stored buffers."""
  module, sd, ref = swin
  ms = {}
  for k, v in sd.items():
    k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
    ms[k.replace("head.fc.", "head.")] = v
  ms["layers.0.blocks.0.attn.relative_position_index"] = np.zeros((16, 16), np.int64)
  ms["layers.0.blocks.1.attn_mask"] = np.zeros((16, 16, 16), np.float32)
  assert "layers.0.downsample.reduction.weight" in ms and "head.weight" in ms
  path = str(tmp_path / "ms_swin.safetensors")
  save_file(ms, path)
  _, got = models.load(module, path)
  _, want = convert.load_state_dict(module, sd)  # timm's layout, checked against timm's logits
  assert jax_equal(got, want)


def test_training_checkpoint_nesting(vit):
  """DeiT's .pth holds {'model': state_dict}; DDP adds 'module.'."""
  module, params, sd, _ = vit
  nested = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": np.array(3)}
  _, got = convert.load_state_dict(module, nested)
  assert jax_equal(got, params)


def jax_equal(a, b) -> bool:
  fa = flax.traverse_util.flatten_dict(a)
  fb = flax.traverse_util.flatten_dict(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def to_vit_jax(params) -> dict[str, np.ndarray]:
  """Our params in Google's vit_jax .npz layout (what AugReg checkpoints use)."""
  heads, w = 3, {}
  w["embedding/kernel"] = params["patch_embed"]["kernel"]
  w["embedding/bias"] = params["patch_embed"]["bias"]
  w["cls"] = params["cls_token"]
  w["Transformer/posembed_input/pos_embedding"] = params["pos_embed"]
  w["Transformer/encoder_norm/scale"] = params["norm"]["scale"]
  w["Transformer/encoder_norm/bias"] = params["norm"]["bias"]
  w["head/kernel"] = params["head"]["kernel"]
  w["head/bias"] = params["head"]["bias"]
  for i in range(2):
    b, p = params[f"blocks_{i}"], f"Transformer/encoderblock_{i}/"
    d = b["norm1"]["scale"].shape[0]
    for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      w[p + theirs + "/scale"] = b[ours]["scale"]
      w[p + theirs + "/bias"] = b[ours]["bias"]
    kernel = b["attn"]["qkv"]["kernel"].reshape(d, 3, heads, d // heads)
    bias = b["attn"]["qkv"]["bias"].reshape(3, heads, d // heads)
    for j, n in enumerate(("query", "key", "value")):
      w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = kernel[:, j]
      w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = bias[j]
    w[p + "MultiHeadDotProductAttention_1/out/kernel"] = b["attn"]["proj"]["kernel"].reshape(heads, d // heads, d)
    w[p + "MultiHeadDotProductAttention_1/out/bias"] = b["attn"]["proj"]["bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      w[p + f"MlpBlock_3/Dense_{j}/kernel"] = b["mlp"][fc]["kernel"]
      w[p + f"MlpBlock_3/Dense_{j}/bias"] = b["mlp"][fc]["bias"]
  return w


def to_big_vision(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """vit_jax layout -> big_vision's: 'params/', renumbered sublayers, scanned blocks,
  position embedding without the class token row (valid when that row is zero)."""
  out = {}
  rename = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
            "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  blocks: dict[str, list] = {}
  for k, v in w.items():
    m = re.match(r"Transformer/encoderblock_(\d+)/(.*)", k)
    if m:
      sub = m.group(2)
      for a, b in rename.items():
        sub = sub.replace(a, b)
      blocks.setdefault(sub, []).append((int(m.group(1)), v))
    elif k == "Transformer/posembed_input/pos_embedding":
      out["params/pos_embedding"] = v[:, 1:]
    else:
      out["params/" + k] = v
  for sub, vs in blocks.items():
    out["params/Transformer/encoderblock/" + sub] = np.stack([v for _, v in sorted(vs, key=lambda t: t[0])])
  return out


def test_augreg_npz_round_trip(vit, tmp_path):
  module, params, _, ref = vit
  path = str(tmp_path / "augreg.npz")
  np.savez(path, **to_vit_jax(params))
  loaded, got = models.load(module, path)
  assert jax_equal(got, params)
  np.testing.assert_array_equal(_logits(loaded, got, ref["images"]), _logits(module, params, ref["images"]))


def test_big_vision_npz(vit, tmp_path):
  module, params, _, ref = vit
  params = flax.core.unfreeze(params)
  params = {**params, "pos_embed": params["pos_embed"].copy()}
  params["pos_embed"][:, 0] = 0  # big_vision gives the class token no position embedding
  path = str(tmp_path / "bv.npz")
  np.savez(path, **to_big_vision(to_vit_jax(params)))
  _, got = models.load(module, path)
  assert jax_equal(got, params)


def test_npz_extra_keys_are_reported(vit, tmp_path):
  module, params, _, _ = vit
  w = to_vit_jax(params)
  w["pre_logits/kernel"] = np.zeros((48, 48), np.float32)
  del w["head/bias"]
  path = str(tmp_path / "extra.npz")
  np.savez(path, **w)
  with pytest.raises(ValueError, match=r"(?s)missing: head/bias.*unused: pre_logits/kernel"):
    models.load(module, path)


def test_native_round_trip(vit, tmp_path):
  module, params, _, ref = vit
  path = str(tmp_path / "ours.safetensors")
  native.save(path, module, params, zoo.Preprocessing(input_size=32))
  loaded, got = models.load("vit_base_patch16_224", path)  # the file's metadata wins
  assert native.describe(loaded) == native.describe(module)
  assert jax_equal(got, params)


def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError, match="Known models: .*deit_small_patch16_224.*fmnist_vit"):
    models.load("resnet50", "x.safetensors")


def test_missing_paths_say_what_to_get(tmp_path):
  with pytest.raises(FileNotFoundError, match="deit_small_patch16_224.fb_in1k"):
    models.load("deit_small_patch16_224")
  with pytest.raises(FileNotFoundError, match="not found"):
    models.load("deit_small_patch16_224", str(tmp_path / "nope.safetensors"))
  if not os.path.exists(os.path.join(convert.ASSET_DIR, "fmnist_swin.safetensors")):
    with pytest.raises(FileNotFoundError, match="fmnist_swin"):
      models.load("fmnist_swin")


def test_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
  path = tmp_path / "deit.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with pytest.raises(ImportError, match=r"pip install -e \.\[parity\]"):
    models.load("deit_tiny_patch16_224", str(path))


def test_pth_with_torch(vit, tmp_path):
  """A DeiT-style .pth ({'model': sd}); only where torch is installed."""
  torch = pytest.importorskip("torch")
  module, params, sd, ref = vit
  path = str(tmp_path / "deit.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  _, got = models.load(module, path)
  assert jax_equal(got, params)


def test_single_channel_checkpoint_loads(tmp_path):
  """Grey-scale models (the Fashion-MNIST test bed) keep their 1-channel patch embedding."""
  module = zoo.custom_vit(img_size=16, patch_size=8, width=24, depth=1, num_heads=2, num_classes=3)
  x = jnp.ones((1, 16, 16, 1))
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  path = str(tmp_path / "grey.safetensors")
  native.save(path, module, params)
  loaded, got = models.load(module, path)
  assert got["patch_embed"]["kernel"].shape == (8, 8, 1, 24)
  np.testing.assert_array_equal(loaded.apply({"params": got}, x), module.apply({"params": params}, x))
