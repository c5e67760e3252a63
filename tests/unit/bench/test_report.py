"""The report: tables with the right numbers, Markdown and HTML pages, PNG plots next to them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.bench.report import method_labels, summarize, tables, write_report
from tests.unit.bench.report_rows import rows, write_results

PNG = b"\x89PNG\r\n\x1a\n"


def test_summary_averages_per_task_then_over_tasks() -> None:
    s = summarize(rows())
    assert s.methods == ["none", "knorm", "snapkv"] and s.ratios == [0.0, 0.25, 0.5] and s.tasks == ["niah", "vt"]
    assert s.cells[("knorm", 0.25)].scores == {"niah": 0.75, "vt": 0.25}
    assert s.cells[("knorm", 0.25)].average == pytest.approx(0.5)
    assert s.cells[("snapkv", 0.5)].kv_after == 2 * 2**20
    assert s.cells[("knorm", 0.5)].prefill_s == pytest.approx(0.5 + 0.5 + (0.064 + 0.128) / 2)  # mean over lengths
    assert s.cells[("none", 0.0)].by_length == {64: 0.75, 128: 0.75}


def test_pivot_table_is_methods_by_ratios() -> None:
    _title, header, body = tables(summarize(rows()))[0]
    assert header == ["method", "0", "0.25", "0.5"]
    assert body[0] == ["none", "75.0", "", ""]
    assert body[1] == ["knorm", "", "50.0", "25.0"]


def test_labels_keep_options_only_where_they_differ() -> None:
    rs = [*rows()[:1], {**rows()[-1], "method": "SnapKV(ratio=0.5, window=16, kernel=5)"}, rows()[-1]]
    labels = method_labels(rs)
    assert labels["none"] == "none"
    assert labels["SnapKV(ratio=0.5, window=16, kernel=5)"] == "SnapKV(window=16, kernel=5)"


def test_write_report_makes_markdown_html_and_plots(tmp_path: Path) -> None:
    files = write_report(write_results(tmp_path))
    md = files.markdown.read_text()
    assert "| method | 0 | 0.25 | 0.5 |" in md and "| knorm |  | 50.0 | 25.0 |" in md
    assert "KV MiB after" in md and "by context length" in md and "Model: tiny" in md
    page = files.html.read_text()
    assert page.count("<table>") == 3 and "<th>average</th>" in page
    for plot in files.plots:
        assert plot.parent == tmp_path and plot.read_bytes().startswith(PNG) and plot.stat().st_size > 5000
        assert f'src="{plot.name}"' in page and f"]({plot.name})" in md


def test_report_of_an_empty_directory_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kvsqueeze bench --out"):
        write_report(tmp_path)
