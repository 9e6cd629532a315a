"""launch/colab.ipynb: generated from launch/colab.py, and it runs top to bottom."""
import base64
import io
import os
import sys

import nbformat
from nbclient import NotebookClient
import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import make_notebook  # noqa: E402  pylint: disable=g-import-not-at-top


def test_notebook_is_generated_from_its_source():
  with open(make_notebook.SOURCE) as f:
    source = f.read()
  with open(make_notebook.NOTEBOOK) as f:
    committed = f.read()
  assert committed == make_notebook.render(source), (
      "launch/colab.ipynb is out of date: run python launch/make_notebook.py")
  # Every code cell of the script is a code cell of the notebook, in order.
  nb = nbformat.reads(committed, as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  chunks = source.split("# %%")
  assert len(nb.cells) == len(chunks) - 1
  for text in code:
    assert text.strip() and text in source


def test_cells_of_a_small_script():
  cells = make_notebook.cells("# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n"
                              "print(x)\n\n# %%\ny = 2\n")
  assert [(c.cell_type, c.source) for c in cells] == [
      ("markdown", "# Title\n\ntext"), ("code", "x = 1\n\nprint(x)"), ("code", "y = 2")]
  with pytest.raises(ValueError, match="before the first"):
    make_notebook.cells("x = 1\n# %%\n")
  with pytest.raises(ValueError, match="not a comment"):
    make_notebook.cells("# %% [markdown]\n# a\nb\n")


def _png(output) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"]))))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
                    reason="needs the Fashion-MNIST IDX files")
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  """On the CPU, in a fresh kernel, from a scratch directory (the package is installed, so
  the install cell does nothing): the images, the attention figure and the report appear."""
  with open(make_notebook.NOTEBOOK) as f:
    nb = nbformat.read(f, as_version=4)
  # The notebook's own counts, cut further (compiling dominates; every cell still runs).
  cuts = {"config.synth.iterations, config.synth.warmup = 20, 2":
          "config.synth.iterations, config.synth.warmup = 4, 1",
          "config.quant.recon.iters = 10": "config.quant.recon.iters = 2",
          "config.eval.limit = 1000": "config.eval.limit = 200"}
  for old, new in cuts.items():
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
    cell.source = cell.source.replace(old, new)
  # The kernel imports configs/ from the repository, as Colab does from its clone.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "SPDFQ W4A4 top-1" in text and "(200 test images)" in text
  images = [_png(o) for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the image grid, the attention figure
  work = tmp_path / "colab_work"
  for shown, name in zip(images, ("grid.png", "attention.png")):
    (path,) = work.glob(f"synthetic/*/{name}")
    np.testing.assert_array_equal(shown, np.asarray(Image.open(path)))
  (table,) = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
  assert table == (work / "report.md").read_text()
  assert "| fmnist_vit | spdfq | W4A4 | 8 |" in table
