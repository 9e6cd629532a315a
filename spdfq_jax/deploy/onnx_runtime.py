"""Running an exported ONNX graph in ONNX Runtime (CPU): logits, and which kernels ran."""
from __future__ import annotations

import collections
import json
import os
import tempfile
from typing import Callable, Optional, Union

import jax
import numpy as np
import onnx
import onnxruntime as ort

from spdfq_jax.deploy import onnx_graph, onnx_layers
from spdfq_jax.models import native, zoo


def session(model: Union[str, onnx.ModelProto], threads: Optional[int] = None,
            profile_dir: Optional[str] = None) -> ort.InferenceSession:
  """A CPU session with every graph optimisation on but constant folding, which would fold
  each layer's scale product before the MatMulIntegerToFloat fusion can see it (the graph
  holds no other constant subgraph). `threads`: intra-op threads, None = one per core."""
  opts = ort.SessionOptions()
  opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  if threads:
    opts.intra_op_num_threads = threads
  if profile_dir:
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(profile_dir, "ort")
  src = model if isinstance(model, str) else model.SerializeToString()
  return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"],
                              disabled_optimizers=["ConstantFolding"])


def describe(path: str) -> tuple[zoo.Model, int, int]:
  """(module, input channels, classes) of a graph `onnx_graph.build` wrote."""
  model = onnx.load(path, load_external_data=False)
  props = {p.key: p.value for p in model.metadata_props}
  if onnx_graph.META_KEY not in props:
    raise ValueError(f"{path} was not written by spdfq_jax.tools.export_onnx (no "
                     f"'{onnx_graph.META_KEY}' metadata)")
  dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
  return (native.rebuild(json.loads(props[onnx_graph.META_KEY])),
          dims(model.graph.input[0])[-1], dims(model.graph.output[0])[-1])


def logits(sess: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
  return sess.run([onnx_layers.OUTPUT], {onnx_layers.INPUT: np.asarray(images, np.float32)})[0]


def jax_logits(sess: ort.InferenceSession, num_classes: int,
               record: Optional[list] = None) -> Callable[[jax.Array], jax.Array]:
  """The session as a function of JAX arrays that also runs inside `jax.jit` (through a
  host callback), so `evaluate.evaluate` can drive it like the JAX models. `record`: a list
  that each call's logits are appended to, in call order."""
  def run(x: np.ndarray) -> np.ndarray:
    out = logits(sess, x)
    if record is not None:
      record.append(out)
    return out

  def fn(images: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((images.shape[0], num_classes), np.float32)
    return jax.pure_callback(run, out, images)
  return fn


def kernels_ran(model: Union[str, onnx.ModelProto], images: np.ndarray,
                threads: Optional[int] = None) -> dict:
  """{op type: {'nodes': count, 'ms': total time}} of one profiled run (after a warm-up),
  from ONNX Runtime's profiler: the kernels it chose after fusing the graph."""
  with tempfile.TemporaryDirectory() as tmp:
    sess = session(model, threads, profile_dir=tmp)
    logits(sess, images)
    logits(sess, images)
    trace = sess.end_profiling()
    with open(trace) as f:
      events = json.load(f)
  runs = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
  last_run = collections.defaultdict(list)
  for e in runs:
    last_run[e["name"]].append(e)
  out = collections.defaultdict(lambda: {"nodes": 0, "ms": 0.0})
  for name, evs in last_run.items():
    e = evs[-1]  # the second, warm run
    op = e["args"].get("op_name", "?")
    out[op]["nodes"] += 1
    out[op]["ms"] += e["dur"] / 1000.0
  return {k: {"nodes": v["nodes"], "ms": round(v["ms"], 2)}
          for k, v in sorted(out.items(), key=lambda kv: -kv[1]["ms"])}
