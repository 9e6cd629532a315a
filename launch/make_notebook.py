"""Writes launch/colab.ipynb from launch/colab.py, the notebook's source.

  python launch/make_notebook.py           # regenerate the notebook
  python launch/make_notebook.py --check   # exit 1 when the notebook is out of date

The source is a Python script with cells marked `# %%` (code) and `# %% [markdown]`
(markdown, every line commented out), the percent format editors and jupytext read.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "colab.py")
NOTEBOOK = os.path.join(HERE, "colab.ipynb")
_MARKER = re.compile(r"^# %%( \[markdown\])?\s*$")


def _strip_blank(lines: list[str]) -> list[str]:
  """Without the blank lines at either end."""
  while lines and not lines[0].strip():
    lines = lines[1:]
  while lines and not lines[-1].strip():
    lines = lines[:-1]
  return lines


def _markdown(lines: list[str]) -> str:
  """'# text' -> 'text', '#' -> ''."""
  out = []
  for line in _strip_blank(lines):
    if not line.startswith("#"):
      raise ValueError(f"markdown cell line is not a comment: {line!r}")
    out.append(line[2:] if line.startswith("# ") else line[1:])
  return "\n".join(out)


def cells(source: str) -> list[nbformat.NotebookNode]:
  """The cells of a percent-format script, in order; text before the first marker is an error."""
  v4 = nbformat.v4
  found: list[tuple[bool, list[str]]] = []
  for number, line in enumerate(source.splitlines(), 1):
    m = _MARKER.match(line)
    if m:
      found.append((bool(m.group(1)), []))
    elif found:
      found[-1][1].append(line)
    elif line.strip():
      raise ValueError(f"line {number} comes before the first '# %%' cell marker")
  out = []
  for i, (is_markdown, lines) in enumerate(found):
    if is_markdown:
      cell = v4.new_markdown_cell(_markdown(lines))
    else:
      cell = v4.new_code_cell("\n".join(_strip_blank(lines)))
    cell.id = f"cell-{i}"  # stable ids: the same source gives the same file
    out.append(cell)
  return out


def render(source: str) -> str:
  """The notebook file's text for a percent-format script."""
  nb = nbformat.v4.new_notebook(cells=cells(source))
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
      "accelerator": "GPU",
  }
  nbformat.validate(nb)
  return nbformat.writes(nb) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--check", action="store_true", help="only compare, exit 1 when stale")
  opts = ap.parse_args()
  with open(SOURCE) as f:
    text = render(f.read())
  if opts.check:
    with open(NOTEBOOK) as f:
      if f.read() != text:
        sys.exit(f"{NOTEBOOK} is out of date: run python launch/make_notebook.py")
    return
  with open(NOTEBOOK, "w") as f:
    f.write(text)
  print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
  main()
