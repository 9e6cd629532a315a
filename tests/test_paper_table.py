"""The paper-layout table: report.paper_tables / paper_markdown and tools.paper_table."""
import json

import pytest

from spdfq_jax import report
from spdfq_jax.tools import paper_table

VITS = "vit_small_patch16_224"
DEITS = "deit_small_patch16_224"


def _row(model, method, quant, fp=81.0, w=4, a=4, paper=None):
  row = dict(model=model, method=method, w_bits=w, a_bits=a, quant_top1=quant, fp_top1=fp)
  if paper is not None:
    row["paper_top1"] = paper
  return row


def _lines(table):
  return table.splitlines()


def test_paper_cell_shows_both_figures_and_a_non_paper_model_only_ours():
  rows = [_row(VITS, "psaq", 47.1, fp=81.2, paper=47.24), _row("fmnist_vit", "psaq", 60.0)]
  t = report.paper_tables(rows, {VITS: 81.39})["W4A4"]
  assert _lines(t) == ["| model | FP | PSAQ-ViT |", "|---|---|---|",
                       f"| {VITS} | 81.20 (paper 81.39) | 47.10 (paper 47.24) |",
                       "| fmnist_vit | 81.00 | 60.00 |"]


def test_fp_without_paper_figure_shows_only_ours():
  t = report.paper_tables([_row(VITS, "spdfq", 50.0, fp=81.2, paper=50.32)])["W4A4"]
  assert _lines(t)[2] == f"| {VITS} | 81.20 | 50.00 (paper 50.32) |"


def test_columns_follow_the_papers_order_whatever_the_row_order():
  methods = ("real", "spdfq", "smi", "psaq", "noise", "inversion", "psaq_v2", "mimiq")
  rows = [_row(VITS, m, float(i)) for i, m in enumerate(methods)]
  header = _lines(report.paper_tables(rows)["W4A4"])[0]
  assert header == ("| model | FP | noise | inversion | PSAQ-ViT | PSAQ-ViT V2 | SMI | SPDFQ "
                    "| MimiQ | real images |")
  assert _lines(report.paper_tables(rows)["W4A4"])[2] == (
      f"| {VITS} | 81.00 | 4.00 | 5.00 | 3.00 | 6.00 | 2.00 | 1.00 | 7.00 | 0.00 |")


def test_a_cell_not_run_is_a_dash_and_unknown_methods_come_last():
  rows = [_row(VITS, "custom", 1.0), _row(VITS, "spdfq", 50.0), _row(DEITS, "noise", 20.0)]
  assert _lines(report.paper_tables(rows)["W4A4"]) == [
      "| model | FP | noise | SPDFQ | custom |", "|---|---|---|---|---|",
      f"| {VITS} | 81.00 | - | 50.00 | 1.00 |", f"| {DEITS} | 81.00 | 20.00 | - | - |"]


def test_two_bit_settings_give_two_tables():
  rows = [_row(VITS, "spdfq", 50.0, paper=50.32), _row(VITS, "spdfq", 20.0, w=3, a=3)]
  tables = report.paper_tables(rows)
  assert list(tables) == ["W4A4", "W3A3"]
  assert _lines(tables["W4A4"])[2] == f"| {VITS} | 81.00 | 50.00 (paper 50.32) |"
  assert _lines(tables["W3A3"])[2] == f"| {VITS} | 81.00 | 20.00 |"
  md = report.paper_markdown(rows)
  assert md.index("## W4A4") < md.index("## W3A3")


def _write_report(workdir, rows, fp_paper=None):
  workdir.mkdir()
  config = {"paper": {} if fp_paper is None else {"fp": fp_paper}}
  data = dict(rows[0], rows=rows, config=config)
  (workdir / "report.json").write_text(json.dumps(data))
  return str(workdir)


def test_write_puts_paper_table_beside_report_md(tmp_path):
  rows = [_row(VITS, "spdfq", 50.0, fp=81.2, paper=50.32)]
  report.write(str(tmp_path), dict(title="t", rows=rows, config={"paper": {"fp": 81.39}}))
  md = (tmp_path / report.PAPER_TABLE_FILE).read_text()
  assert f"| {VITS} | 81.20 (paper 81.39) | 50.00 (paper 50.32) |" in md.splitlines()
  assert md.startswith("# Top-1 (%) on ImageNet, in the paper's layout")


def test_heading_names_the_test_bed_a_run_evaluated_on(tmp_path):
  rows = [_row("fmnist_vit", "smi", 84.3)]
  report.write(str(tmp_path), dict(title="t", rows=rows,
                                   config={"data": {"name": "fashion_mnist"}}))
  md = (tmp_path / report.PAPER_TABLE_FILE).read_text()
  assert md.startswith("# Top-1 (%) on Fashion-MNIST, in the paper's layout")


def test_merge_tool_gives_both_model_lines(tmp_path, capsys):
  a = _write_report(tmp_path / "a", [_row(VITS, "psaq", 47.1, fp=81.2, paper=47.24)],
                    fp_paper=81.39)
  b = _write_report(tmp_path / "b", [_row("fmnist_vit", "spdfq", 60.0)])
  out = tmp_path / "out" / "table.md"
  paper_table.main([a, b, "-o", str(out)])
  lines = out.read_text().splitlines()
  assert "| model | FP | PSAQ-ViT | SPDFQ |" in lines
  assert f"| {VITS} | 81.20 (paper 81.39) | 47.10 (paper 47.24) | - |" in lines
  assert "| fmnist_vit | 81.00 | - | 60.00 |" in lines
  paper_table.main([a, b])
  assert capsys.readouterr().out.splitlines()[-len(lines):] == lines


def test_missing_report_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit) as e:
    paper_table.main([str(tmp_path)])
  msg = str(e.value)
  assert str(tmp_path / "report.json") in msg and "does not exist" in msg
  assert f"python -m spdfq_jax.main --workdir={tmp_path}" in msg and "\n" not in msg


def test_psaq_v2_is_labelled_as_built_from_its_paper():
  with_v2 = [_row(VITS, "psaq_v2", 40.0), _row(VITS, "spdfq", 50.0)]
  for text in (report.paper_markdown(with_v2), report.markdown({"rows": with_v2})):
    assert "PSAQ-ViT V2 (psaq_v2) is built from its paper: no reference code" in text
  without = [_row(VITS, "spdfq", 50.0)]
  assert "reference code" not in report.paper_markdown(without)
