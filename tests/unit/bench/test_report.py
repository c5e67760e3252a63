"""The report: tables with the right numbers, Markdown and HTML pages, PNG plots next to them (and inside the HTML),
the pages alone without matplotlib."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from kvsqueeze.bench import report
from kvsqueeze.bench.report import render_markdown, tables, write_report
from kvsqueeze.bench.statistics import Interval
from kvsqueeze.bench.summary import method_labels, summarize
from tests.unit.bench.report_rows import answer_row, rows, scored_rows, write_results

SRC = Path(__file__).resolve().parents[3] / "src"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter on this checkout's sources (what it imports stays there)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


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
    # none: niah 8 of 8 (Wilson [67.6, 100]) and vt 0.5 on every question (a bootstrap of constants: [50, 50]),
    # combined: 75 ± √(0.162²) / 2; knorm at 0.25: two constant partial scores, no spread to see
    assert body[0] == ["none", "75.0 [62.8, 87.2]", "", ""]
    assert body[1] == ["knorm", "", "50.0 [50.0, 50.0] *", "25.0 [12.8, 37.2] *"]


def _table(s: Any, title: str) -> tuple[list[str], list[list[str]]]:
    (found,) = [(header, body) for t, header, body in tables(s) if t.startswith(title)]
    return found


def test_scores_print_their_interval_and_significant_cells_are_marked() -> None:
    # Wilson 95%: 10/10 -> [10 / (10 + z²), 1] = [72.2, 100]; 4/10 -> [16.8, 68.7]; 9/10 -> [59.6, 98.2]
    s = summarize(scored_rows({("none", 0.0): [1.0] * 10, ("knorm", 0.5): [1.0] * 4 + [0.0] * 6,
                               ("snapkv", 0.5): [1.0] * 9 + [0.0]}))  # fmt: skip
    _, pivot = _table(s, "Average score")
    assert pivot == [["none", "100.0 [72.2, 100.0]", ""], ["knorm", "", "40.0 [16.8, 68.7] *"],
                     ["snapkv", "", "90.0 [59.6, 98.2]"]]  # fmt: skip
    header, details = _table(s, "Per task")
    assert details[1][header.index("niah")] == details[1][header.index("average")] == "40.0 [16.8, 68.7] *"
    header, paired = _table(s, "Paired test")
    assert header[2:] == ["questions", "difference (points)", "better", "worse", "test", "p", "significant"]
    assert paired == [["knorm", "0.5", "10", "-60.0", "0", "6", "mcnemar", "0.0312", "yes"],
                      ["snapkv", "0.5", "10", "-10.0", "0", "1", "mcnemar", "1.0000", "no"]]  # fmt: skip
    header, ranking = _table(s, "Ranking at each ratio")
    assert header[:4] == ["ratio", "rank", "method", "score"]
    assert ranking == [["0.5", "1", "snapkv", "90.0 [59.6, 98.2]", "+50.0", "5", "0", "0.0625", "no"],
                       ["0.5", "2", "knorm", "40.0 [16.8, 68.7]", "", "", "", "", ""]]  # fmt: skip
    md = render_markdown(s)
    assert "| knorm |  | 40.0 [16.8, 68.7] * |" in md and "exact McNemar" in md and "p < 0.05" in md


def test_breakdown_tables_show_each_source_and_phrasing() -> None:
    rs = [
        answer_row(
            "knorm",
            0.5,
            float(i % 4 == 0),
            i,
            sample_meta={"source": ("prose", "python_docs")[i % 2], "phrasing": "magic"},
        )
        for i in range(12)
    ]
    header, body = _table(summarize(rs), "Average score (%) by haystack source")
    assert header == ["method", "ratio", "prose", "python_docs"]
    assert body == [["knorm", "0.5", "50.0 [18.8, 81.2]", "0.0 [0.0, 39.0]"]]  # 3/6 and 0/6, Wilson
    header, body = _table(summarize(rs), "Average score (%) by needle phrasing")
    assert header[2:] == ["magic"] and body[0][2].startswith("25.0 [")
    assert not [t for t, _, _ in tables(summarize(rows())) if "by haystack" in t]


def test_score_plot_draws_the_intervals(tmp_path: Path) -> None:
    """Two summaries that differ only in their intervals give different score plots (error bars), and the same
    KV plots."""
    s = summarize(rows())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = report.plot(s, tmp_path / "a")
    for cell in s.cells.values():
        cell.interval = Interval(max(0.0, cell.average - 0.2), min(1.0, cell.average + 0.2), "wilson")
    second = report.plot(s, tmp_path / "b")
    assert first[0].read_bytes() != second[0].read_bytes()
    assert first[1].read_bytes() == second[1].read_bytes()


def test_labels_keep_options_only_where_they_differ() -> None:
    rs = [*rows()[:1], {**rows()[-1], "method": "SnapKV(ratio=0.5, window=16, kernel=5)"}, rows()[-1]]
    labels = method_labels(rs)
    assert labels["none"] == "none"
    assert labels["SnapKV(ratio=0.5, window=16, kernel=5)"] == "SnapKV(window=16, kernel=5)"


class _Links(HTMLParser):
    """Every URL an HTML page points at: src/href attributes, and url(...) in its styles."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value or "" for name, value in attrs if name in ("src", "href", "srcset", "data", "poster")]

    def handle_data(self, data: str) -> None:
        self.urls += [part.split(")")[0].strip("'\" ") for part in data.split("url(")[1:]]


def test_write_report_makes_markdown_html_and_plots(tmp_path: Path) -> None:
    files = write_report(write_results(tmp_path))
    md = files.markdown.read_text()
    assert "| method | 0 | 0.25 | 0.5 |" in md and "| knorm |  | 50.0 [50.0, 50.0] * | 25.0 [12.8, 37.2] * |" in md
    assert "KV MiB after" in md and "by context length" in md and "Model: tiny" in md
    assert "95% interval in brackets" in md and "Paired test against 'none'" in md
    page = files.html.read_text()
    assert page.count("<table>") == 6 and "<th>average</th>" in page  # ... paired tests, ranking, frontier
    assert len(files.plots) == 4 and files.plots_skipped is None
    for plot in files.plots:
        assert plot.parent == tmp_path and plot.read_bytes().startswith(PNG) and plot.stat().st_size > 5000
        assert f"]({plot.name})" in md  # the Markdown links the PNG next to it
        embedded = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode()
        assert f'src="{embedded}"' in page  # the HTML carries the same image inside


def test_html_report_references_no_other_file(tmp_path: Path) -> None:
    """report.html is self-contained: every URL in it is a data: URI (it can be mailed or moved alone)."""
    files = write_report(write_results(tmp_path))
    links = _Links()
    links.feed(files.html.read_text())
    assert len([u for u in links.urls if u.startswith("data:image/png;base64,")]) == 4
    assert links.urls and all(u.startswith("data:") for u in links.urls), [u[:40] for u in links.urls]


def test_without_matplotlib_the_pages_are_written_and_say_why_no_plots(tmp_path: Path) -> None:
    """matplotlib is an extra: blocked (as if not installed), the report still has its tables and says how to get
    the plots. Run in a subprocess, so blocking the import cannot leak into other tests."""
    out = write_results(tmp_path)
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from kvsqueeze.bench.report import write_report\n"
            f"files = write_report({str(out)!r})\n"
            "print(len(files.plots), files.plots_skipped)")  # fmt: skip
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("0 matplotlib is not installed") and "kvsqueeze[plot]" in done.stdout
    assert not list(tmp_path.glob("*.png"))
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "| knorm |  | 50.0 [50.0, 50.0] * | 25.0 [12.8, 37.2] * |" in md and "<th>average</th>" in page
    for text in (md, page):
        assert "Plots skipped: matplotlib is not installed" in text and "kvsqueeze[plot]" in text
    assert "<img" not in page and ".png" not in md


def test_plots_leave_pyplot_and_the_global_backend_alone(tmp_path: Path) -> None:
    """The report draws on Figure objects: writing it neither imports pyplot nor switches matplotlib's backend (an
    application embedding kvsqueeze keeps its own). In a subprocess, to see what the report alone imports."""
    out = write_results(tmp_path)
    code = ("import sys, matplotlib; matplotlib.use('svg')\n"
            "from kvsqueeze.bench.report import write_report\n"
            f"files = write_report({str(out)!r})\n"
            "print(len(files.plots), matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")  # fmt: skip
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "svg", "False"]


def test_report_of_an_empty_directory_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kvsqueeze bench --out"):
        write_report(tmp_path)
