"""report.json / report.md / metrics writers."""
import json
import os

import numpy as np

from spdfq_jax import report


def _report():
  rows = [dict(model="fmnist_vit", method=m, w_bits=4, a_bits=4, num_images=32,
               fp_top1=np.float64(90.1), quant_top1=q, fp_top5=99.9, quant_top5=99.0,
               timings={"synthesize": 1.5, "quantize": 2.0, "evaluate": 0.5})
          for m, q in (("noise", 50.0), ("spdfq", 80.25))]
  return dict(title="t", rows=rows, machine={"device_kind": "cpu", "device_count": 1},
              packages=report.package_versions(), date=report.now(), total_seconds=4.0)


def test_writes_json_and_markdown(tmp_path):
  json_path, md_path = report.write(str(tmp_path), _report())
  data = json.load(open(json_path))
  assert data["rows"][1]["quant_top1"] == 80.25 and "jax" in data["packages"]
  md = open(md_path).read()
  assert "| model | method | W/A | images | FP top-1 | quant top-1 | quant top-5 |" in md
  assert "| fmnist_vit | spdfq | W4A4 | 32 | 90.10 | 80.25 | 99.00 |" in md
  assert "synthesize (s)" in md


def test_table_marks_missing_cells():
  t = report.table([{"model": "a", "quant_top1": 1.0}, {"model": "b"}])
  assert t.splitlines()[-1] == "| b | - |"


def test_metrics_jsonl_and_tensorboard(tmp_path):
  with report.MetricsWriter(str(tmp_path)) as w:
    w.write(0, {"loss": np.float32(1.5)}, prefix="synth/")
    w.write(1, {"loss": 1.0, "note": "x"}, prefix="synth/")
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["synth/loss"] for l in lines] == [1.5, 1.0]
  assert os.listdir(tmp_path / "tensorboard")


def test_image_grid():
  g = report.image_grid(np.zeros((5, 4, 4, 1)), [0.5], [0.5], cols=2)
  assert g.shape == (3 * 6 + 2, 2 * 6 + 2, 3) and g.dtype == np.uint8
