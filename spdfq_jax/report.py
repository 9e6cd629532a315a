"""What a run leaves behind for people: report.json, report.md, paper_table.md, metrics,
image grids.

The JSON is the record (numbers in percent, timings in seconds, the machine and package
versions, so a figure can be traced); the markdown is the same content as tables. Metrics
stream to `metrics.jsonl` and, when tensorflow is importable, to TensorBoard.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from spdfq_jax import checkpoint

PACKAGES = ("spdfq_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "ml-collections", "tensorflow-datasets", "tensorflow-cpu", "tensorflow")

# Columns of the result table: (key in a row, header, format).
RESULT_COLUMNS = (("model", "model", "{}"), ("method", "method", "{}"),
                  ("bits", "W/A", "{}"), ("num_images", "images", "{}"),
                  ("fp_top1", "FP top-1", "{:.2f}"), ("quant_top1", "quant top-1", "{:.2f}"),
                  ("quant_top5", "quant top-5", "{:.2f}"), ("eval_path", "evaluated on", "{}"),
                  ("paper_top1", "paper", "{:.2f}"),
                  ("class_fit", "class fit %", "{:.0f}"),
                  ("region_class_fit", "region class fit %", "{:.0f}"),
                  ("kept_class_fit", "kept-token class fit %", "{:.0f}"),
                  ("prior_fit", "prior fit", "{:.3f}"), ("prior_fit_chance", "chance", "{:.3f}"))


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
  """Installed versions of the packages a result depends on (missing ones left out)."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def machine() -> dict[str, Any]:
  """Accelerator kind and count, hosts, and the host's platform: where a number came from."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"device_kind": devices[0].device_kind, "device_count": len(devices),
          "platform": devices[0].platform, "process_count": jax.process_count(),
          "host": platform.node(), "cpu_count": os.cpu_count(),
          "python": platform.python_version()}


def now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _cell(value: Any, fmt: str) -> str:
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return "-"
  try:
    return fmt.format(value)
  except (ValueError, TypeError):
    return str(value)


def table(rows: Sequence[Mapping[str, Any]],
          columns: Sequence[tuple[str, str, str]] = RESULT_COLUMNS) -> str:
  """A markdown table of `rows`; columns that no row has are dropped, missing cells are '-'."""
  columns = [c for c in columns if any(c[0] in r for r in rows)]
  lines = ["| " + " | ".join(c[1] for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |")
  return "\n".join(lines)


def bits_label(w_bits: int, a_bits: int) -> str:
  return f"W{w_bits}A{a_bits}"


def markdown(report: Mapping[str, Any]) -> str:
  """report.md: result table, stage timings per row, then where and with what it ran."""
  rows = [dict(r, bits=bits_label(r["w_bits"], r["a_bits"])) for r in report["rows"]]
  parts = [f"# {report.get('title', 'SPDFQ run')}", ""]
  if report.get("description"):
    parts += [report["description"], ""]
  parts += [table(rows), ""] + [line + "\n" for line in method_notes(rows)]
  stages = sorted({s for r in rows for s in r.get("timings", {})},
                  key=lambda s: list(STAGE_ORDER).index(s) if s in STAGE_ORDER else 99)
  if stages:
    cols = [("method", "method", "{}"), ("bits", "W/A", "{}")] + [
        (f"t_{s}", f"{s} (s)", "{:.1f}") for s in stages]
    timing_rows = [dict(r, **{f"t_{s}": r["timings"].get(s) for s in stages}) for r in rows]
    parts += ["## Stage timings", "", table(timing_rows, cols), ""]
  env = report.get("machine", {})
  parts += ["## Run", "",
            f"- date: {report.get('date', '-')}",
            f"- workdir: `{report.get('workdir', '-')}`",
            f"- config: `{report.get('config_name', '-')}`",
            f"- devices: {env.get('device_count', '-')} x {env.get('device_kind', '-')} "
            f"({env.get('process_count', 1)} host(s)), host cpus {env.get('cpu_count', '-')}",
            f"- total time: {_cell(report.get('total_seconds'), '{:.1f}')} s",
            "- packages: " + ", ".join(f"{k} {v}" for k, v in report.get("packages", {}).items()),
            ""]
  return "\n".join(parts)


# The paper's results table (arXiv 2412.16553): calibration sources in its column order,
# as (method, header); methods outside it follow in the order the rows give them.
PAPER_SOURCES = (("noise", "noise"), ("inversion", "inversion"), ("psaq", "PSAQ-ViT"),
                 ("psaq_v2", "PSAQ-ViT V2"), ("smi", "SMI"), ("spdfq", "SPDFQ"),
                 ("mimiq", "MimiQ"), ("real", "real images"))
PAPER_TABLE_FILE = "paper_table.md"
# Printed under any table with the method: what the figure rests on.
METHOD_NOTES = {"psaq_v2": "PSAQ-ViT V2 (psaq_v2) is built from its paper: no reference code "
                           "exists; docs/synthesis.md lists the choices the paper leaves open."}


def method_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The notes of the methods among `rows`, as lines."""
  methods = {r["method"] for r in rows}
  return [note for m, note in METHOD_NOTES.items() if m in methods]


def paper_cell(ours: Any, paper: Any = None) -> str:
  """'47.10 (paper 47.24)': our figure with the paper's beside it, so a cell reads as a
  comparison; only ours when the paper has none, '-' when the cell was not run."""
  cell = _cell(ours, "{:.2f}")
  if cell == "-" or paper is None:
    return cell
  return f"{cell} (paper {paper:.2f})"


def paper_fp_of(report: Mapping[str, Any]) -> dict[str, float]:
  """{model: the paper's FP top-1}, from the run's config (config.paper.fp), which the
  rows do not carry; empty for a model the paper does not report."""
  fp = ((report.get("config") or {}).get("paper") or {}).get("fp")
  return {} if fp is None else {r["model"]: fp for r in report.get("rows", [])}


def _first_seen(values: Iterable[Any]) -> list[Any]:
  return list(dict.fromkeys(values))


def _paper_sources(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  """The columns some row has: the paper's in its order, then any other method."""
  methods = _first_seen(r["method"] for r in rows)
  known = [(m, h) for m, h in PAPER_SOURCES if m in methods]
  return known + [(m, m) for m in methods if m not in dict(PAPER_SOURCES)]


def _setting_table(rows: Sequence[Mapping[str, Any]],
                   paper_fp: Mapping[str, float]) -> str:
  """One bit setting: a line per model (first-seen order), FP then each source."""
  sources = _paper_sources(rows)
  cells = {(r["model"], r["method"]): r for r in rows}  # a later row replaces an earlier one
  lines = ["| model | FP | " + " | ".join(h for _, h in sources) + " |",
           "|" + "|".join("---" for _ in range(len(sources) + 2)) + "|"]
  for model in _first_seen(r["model"] for r in rows):
    fp = next((r["fp_top1"] for r in rows if r["model"] == model
               and r.get("fp_top1") is not None), None)
    line = [model, paper_cell(fp, paper_fp.get(model))]
    for method, _ in sources:
      row = cells.get((model, method), {})
      line.append(paper_cell(row.get("quant_top1"), row.get("paper_top1")))
    lines.append("| " + " | ".join(line) + " |")
  return "\n".join(lines)


def paper_tables(rows: Sequence[Mapping[str, Any]],
                 paper_fp: Optional[Mapping[str, float]] = None) -> dict[str, str]:
  """{'W4A4': table, ...} in the rows' order: the paper's layout (models x calibration
  sources), one table per bit setting, so a run reads side by side with the paper."""
  by_bits: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    by_bits.setdefault(bits_label(r["w_bits"], r["a_bits"]), []).append(r)
  return {bits: _setting_table(rs, paper_fp or {}) for bits, rs in by_bits.items()}


DATASET_LABELS = {"imagenet": "ImageNet", "fashion_mnist": "Fashion-MNIST",
                  "scenes": "the scenes test bed"}


def dataset_of(report: Mapping[str, Any]) -> str:
  """What a run evaluated on, as a heading says it."""
  name = ((report.get("config") or {}).get("data") or {}).get("name", "imagenet")
  return DATASET_LABELS.get(name, name)


def paper_markdown(rows: Sequence[Mapping[str, Any]],
                   paper_fp: Optional[Mapping[str, float]] = None,
                   evaluated_on: str = "ImageNet") -> str:
  """paper_table.md: the tables of `paper_tables` under a heading per bit setting."""
  parts = [f"# Top-1 (%) on {evaluated_on}, in the paper's layout", "",
           "Each cell: this run's top-1, with the paper's ImageNet figure (arXiv 2412.16553) "
           "beside it where it reports one; '-' where not run.", ""]
  for bits, t in paper_tables(rows, paper_fp).items():
    parts += [f"## {bits}", "", t, ""]
  parts += [line + "\n" for line in method_notes(rows)]
  return "\n".join(parts)


STAGE_ORDER = ("load", "fp_eval", "real_images", "synthesize", "calibrate", "reconstruct_acts",
               "reparameterize", "reconstruct",
               "quantize", "evaluate", "export")


def write(workdir: str, report: Mapping[str, Any]) -> tuple[str, str]:
  """Writes report.json, report.md and paper_table.md into `workdir` (atomically);
  returns the first two's paths."""
  json_path, md_path = os.path.join(workdir, "report.json"), os.path.join(workdir, "report.md")
  checkpoint.write_text(json_path, json.dumps(to_jsonable(report), indent=2, sort_keys=False)
                        + "\n")
  checkpoint.write_text(md_path, markdown(report))
  checkpoint.write_text(os.path.join(workdir, PAPER_TABLE_FILE),
                        paper_markdown(report["rows"], paper_fp_of(report),
                                       dataset_of(report)))
  return json_path, md_path


def to_jsonable(x: Any) -> Any:
  """numpy/jax scalars and arrays, tuples, ConfigDicts -> plain JSON types."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return np.asarray(x).tolist()
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  checkpoint.write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


class MetricsWriter:
  """Scalars to `<workdir>/metrics.jsonl` (one JSON object per line) and TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = None
    if tensorboard:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
        self._tf = tf
        # tf.summary.scalar lives in the tensorboard package; the core op plus the scalars
        # plugin tag writes the same event without it.
        self._scalar_meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      except Exception:  # pylint: disable=broad-except  # no tensorflow: JSON lines only
        self._tb = None

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
    record = {"step": int(step), "time": now()}
    record.update({prefix + k: to_jsonable(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      with self._tb.as_default():
        for k, v in scalars.items():
          if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            self._tf.summary.write(prefix + k, self._tf.constant(float(v), self._tf.float32),
                                   step=int(step), metadata=self._scalar_meta)
      self._tb.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def image_grid(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
               cols: int = 8) -> np.ndarray:
  """Normalised NHWC images -> one uint8 grid (un-normalised, clipped) for a PNG."""
  x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  n, h, w, c = x.shape
  cols = min(cols, n)
  rows = -(-n // cols)
  grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = x[i]
  return grid


def save_image_grid(path: str, images: np.ndarray, mean: Sequence[float],
                    std: Sequence[float], cols: int = 8) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with checkpoint.atomic_path(path) as tmp:
    Image.fromarray(image_grid(images, mean, std, cols)).save(tmp)
