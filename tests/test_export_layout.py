"""The export file's layout (docs/quantization.md, "Export file layout") held by committed
files: tests/fixtures/export_golden/, written once by tests/fixtures/make_export_golden.py.

The files are read here by a reader of this module's own (safetensors parsed by hand,
codes decoded from the documented layout, plain numpy; nothing from spdfq_jax), and:
  * their bytes are the documented layout of the expected weights stored beside them
    (which nibble holds which code, signed or unsigned, dtypes, shapes);
  * the package's `export.save` writes those same bytes again today (so a change of the
    packing shows even when the package's own reader changed with it);
  * the package's `export.load` reads them to the expected weights and logits.
"""
import json
import os

import ml_collections
import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "export_golden")
CASES = ("vit_w4a4", "vit_w3a3_sym", "vit_w8a8", "vit_w6a4_sym")
META_KEY = "spdfq_jax_quant"
DTYPES = {"U8": np.dtype("<u1"), "I8": np.dtype("<i1"), "F32": np.dtype("<f4")}


# --- a reader from the documented layout (no spdfq_jax) ----------------------------------

def read_safetensors(path):
  """({name: array}, {name: dtype tag}, metadata): an 8-byte little-endian header length,
  the JSON header, then little-endian C-order tensor bytes at the header's offsets."""
  with open(path, "rb") as f:
    raw = f.read()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  meta = header.pop("__metadata__", {})
  tensors, tags = {}, {}
  for name, info in header.items():
    start, end = info["data_offsets"]
    tensors[name] = np.frombuffer(raw[8 + n + start:8 + n + end],
                                  DTYPES[info["dtype"]]).reshape(info["shape"])
    tags[name] = info["dtype"]
  return tensors, tags, meta


def decode_codes(data, info):
  """The integer codes of one kernel (int64, the kernel's shape)."""
  shape, bits = tuple(info["shape"]), info["bits"]
  if info["packing"] == "int4x2":
    low, high = data & 0x0F, data >> 4  # code 2i in the low nibble, 2i + 1 in the high one
    flat = np.stack([low, high], axis=-1).reshape(-1)[:int(np.prod(shape))]
    codes = flat.astype(np.int64).reshape(shape)
    return codes - (2 ** (bits - 1) if info["symmetric"] else 0)  # nibbles are unsigned
  assert info["packing"] == "int8"
  return data.astype(np.int64).reshape(shape)


def read_export(path):
  """(metadata, {kernel path: dequantized float64 kernel}, {kernel path: codes}, tensors)."""
  tensors, tags, raw_meta = read_safetensors(path)
  meta = json.loads(raw_meta[META_KEY])
  weights, codes = {}, {}
  for key, info in meta["packed"].items():
    q = decode_codes(tensors["params/" + key], info)
    scale = tensors[f"wquant/{key}/scale"].astype(np.float64)
    zero = tensors[f"wquant/{key}/zero"].astype(np.float64)
    codes[key] = q
    weights[key] = (q - zero) * scale  # per output channel: broadcast over the last axis
  return meta, weights, codes, (tensors, tags)


def _expected(name):
  with np.load(os.path.join(GOLDEN, name + ".npz"), allow_pickle=False) as f:
    ref = dict(f)
  kernels = {k[len("kernel/"):]: ref.pop(k) for k in list(ref) if k.startswith("kernel/")}
  return json.loads(str(ref["arch"])), kernels, ref["images"], ref["logits"]


def _path(name):
  return os.path.join(GOLDEN, name + ".safetensors")


# --- the committed bytes are the documented layout ---------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_golden_bytes_follow_the_documented_layout(name):
  meta, weights, codes, (tensors, tags) = read_export(_path(name))
  _, kernels, _, _ = _expected(name)
  assert set(meta["packed"]) == set(kernels) and len(kernels) == 6
  cfg = meta["config"]["weights"]
  for key, want in kernels.items():
    info = meta["packed"][key]
    bits, sym = info["bits"], info["symmetric"]
    assert (bits, sym) == (cfg["bits"], cfg["symmetric"])
    assert tuple(info["shape"]) == want.shape
    data, scale = tensors["params/" + key], tensors[f"wquant/{key}/scale"]
    zero = tensors[f"wquant/{key}/zero"]
    # Scale and zero point: float32, one per output channel (the last axis).
    assert tags[f"wquant/{key}/scale"] == tags[f"wquant/{key}/zero"] == "F32"
    assert scale.shape == zero.shape == (want.shape[-1],)
    assert meta["scale_shapes"][key + "/scale"] == [want.shape[-1]]
    np.testing.assert_array_equal(zero, np.round(zero))
    if sym:
      assert np.all(zero == 0)
    # The codes: the expected weight on the channel's grid, signed iff symmetric.
    lo, hi = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    want_codes = np.rint(want.astype(np.float64) / scale + zero).astype(np.int64)
    assert want_codes.min() >= lo and want_codes.max() <= hi
    assert want_codes.min() < 0 if sym else want_codes.max() > 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(codes[key], want_codes, err_msg=key)
    np.testing.assert_allclose(weights[key], want, rtol=1e-6,
                               atol=1e-6 * float(np.abs(want).max()), err_msg=key)
    # The bytes themselves.
    if bits <= 4:
      assert info["packing"] == "int4x2" and tags["params/" + key] == "U8"
      n = want.size
      assert data.shape == ((n + 1) // 2,)
      nibbles = (want_codes + (2 ** (bits - 1) if sym else 0)).reshape(-1)  # C order
      nibbles = np.concatenate([nibbles, np.zeros(n % 2, np.int64)])  # a padding nibble 0
      np.testing.assert_array_equal(data, (nibbles[0::2] | (nibbles[1::2] << 4)).astype(
          np.uint8), err_msg=key)
      # Not vacuous: most bytes hold two different codes, so swapped nibbles would show.
      assert np.mean(nibbles[0::2] != nibbles[1::2]) > 0.5
    else:
      assert info["packing"] == "int8"
      assert tags["params/" + key] == ("I8" if sym else "U8")
      assert data.shape == want.shape
      np.testing.assert_array_equal(data.astype(np.int64), want_codes, err_msg=key)
  # Odd-sized kernels end on a padding nibble (the 4-bit files exercise it).
  if meta["packed"]["head/kernel"]["packing"] == "int4x2":
    assert kernels["head/kernel"].size % 2 == 1
    assert tensors["params/head/kernel"][-1] >> 4 == 0
  # Everything else is float32: parameters, activation quantizer state.
  for k, tag in tags.items():
    if k.startswith("quant/") or (k.startswith("params/") and k[7:] not in meta["packed"]):
      assert tag == "F32", k
  assert any(k.startswith("quant/") for k in tags)


# --- the package writes and reads that layout --------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_package_writes_and_reads_the_golden_layout(name, tmp_path):
  """The quantized model the golden file describes, rebuilt from what the reader above
  decoded (not through the package's reader), is written by `export.save` to the same
  tensors, byte for byte; `export.load` reads the golden file to the expected weights and
  logits."""
  import flax  # pylint: disable=g-import-not-at-top
  from spdfq_jax.models import zoo  # pylint: disable=g-import-not-at-top
  from spdfq_jax.quant import export, qmodel  # pylint: disable=g-import-not-at-top

  arch, kernels, images, logits = _expected(name)
  meta, weights, _, (tensors, tags) = read_export(_path(name))
  cfg = ml_collections.ConfigDict(meta["config"])
  unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep="/")  # noqa: E731
  params = {k[len("params/"):]: np.array(v) for k, v in tensors.items()
            if k.startswith("params/") and k[len("params/"):] not in meta["packed"]}
  params.update({k: w.astype(np.float32) for k, w in weights.items()})
  qstate = {k[len("quant/"):]: np.array(v) for k, v in tensors.items() if k.startswith("quant/")}
  wstate = {k[len("wquant/"):]: np.array(v).reshape(meta["scale_shapes"][k[len("wquant/"):]])
            for k, v in tensors.items() if k.startswith("wquant/")}
  module = zoo.custom_vit(**arch)
  qm = qmodel.build(module, unflat(params), unflat(qstate), unflat(wstate), cfg)
  again = str(tmp_path / "again.safetensors")
  export.save(again, qm)
  new_meta, _, _, (new_tensors, new_tags) = read_export(again)
  assert new_meta["packed"] == meta["packed"]
  assert new_meta["scale_shapes"] == meta["scale_shapes"]
  assert new_tags == tags
  for k, v in tensors.items():
    assert new_tensors[k].shape == v.shape, k
    assert new_tensors[k].tobytes() == v.tobytes(), k

  loaded = export.load(_path(name))
  flat = flax.traverse_util.flatten_dict(loaded.variables["params"], sep="/")
  for key, want in kernels.items():
    np.testing.assert_allclose(np.asarray(flat[key]), want, rtol=1e-6,
                               atol=1e-6 * float(np.abs(want).max()), err_msg=key)
  got = np.asarray(loaded.logits(images))
  np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5 * float(np.abs(logits).max()))
