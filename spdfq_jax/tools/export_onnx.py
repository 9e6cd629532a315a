"""Writes a quantized export as an ONNX graph for ONNX Runtime's int8 kernels.

  python -m spdfq_jax.tools.export_onnx EXPORTED.safetensors -o model.onnx [--fp] [--signed_8bit]

EXPORTED is what the pipeline's export stage writes (`rows/<row>/quantized.safetensors`).
The graph holds the export's own weight codes, scales and zero points and the calibrated
activation state (docs/deployment.md: which operators, what stays float). --fp writes the
FP32 graph of the same dequantized weights instead (a baseline for speed). Run it with
`python -m spdfq_jax.tools.infer model.onnx --config=...`. Needs the `onnx` extra
(`pip install -e ".[onnx]"`).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_OUTPUT = flags.DEFINE_string("output", None, "Where to write the .onnx file.", short_name="o")
_FP = flags.DEFINE_bool("fp", False, "Write the FP32 graph of the dequantized weights.")
_SIGNED_8BIT = flags.DEFINE_bool(
    "signed_8bit", False, "8-bit weights as int8 operands (faster; exact only on CPUs with "
    "VNNI or AMX, where ONNX Runtime's int8 kernel sums in int32, and on ARM).")


def export(src: str, dst: str, fp: bool = False, signed_8bit: bool = False) -> dict:
  """Writes the graph of the export at `src` to `dst`; returns what was written."""
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    from spdfq_jax.deploy import onnx_graph, onnx_layers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"ONNX export needs the onnx extra: pip install -e \".[onnx]\" ({e})") from e
  from spdfq_jax.quant import integer_model  # pylint: disable=g-import-not-at-top
  model = onnx_graph.build(integer_model.export_parts(src), fp=fp, signed_8bit=signed_8bit)
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  onnx.save(model, dst)
  ops = {}
  for node in model.graph.node:
    ops[node.op_type] = ops.get(node.op_type, 0) + 1
  return {"onnx": dst, "from": src, "graph": "fp32" if fp else "quantized",
          "bytes": os.path.getsize(dst), "opset": onnx_layers.OPSET, "ops": ops}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or not _OUTPUT.value:
    sys.exit("usage: python -m spdfq_jax.tools.export_onnx EXPORTED.safetensors -o model.onnx "
             "[--fp] [--signed_8bit]")
  try:
    out = export(argv[1], _OUTPUT.value, _FP.value, _SIGNED_8BIT.value)
  except (ImportError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
