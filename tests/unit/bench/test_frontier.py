"""The score-vs-bytes frontier: the pure computation on hand-made points, the points a summary gives (one per
(method, ratio, bits) cell), the report's frontier table and plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.bench import report
from kvsqueeze.bench.frontier import MIB, Point, frontier_step, pareto_frontier, points
from kvsqueeze.bench.report import tables
from kvsqueeze.bench.statistics import Interval
from kvsqueeze.bench.summary import summarize
from tests.unit.bench.report_rows import answer_row


def _p(label: str, mib: float, score: float, ratio: float = 0.0) -> Point:
    return Point(label, label.split("@")[0], ratio, None, mib * MIB, score)


def test_the_frontier_keeps_the_best_score_for_at_most_each_size() -> None:
    e, d, b, c = _p("e", 10, 0.2), _p("d", 25, 0.8), _p("b", 50, 0.8), _p("c", 50, 0.7)
    a, f = _p("a", 100, 0.9), _p("f", 200, 0.9)
    # by bytes: e .2 (best so far) | d .8 beats .2 | b .8 and c .7 do not beat .8 | a .9 beats .8 | f .9 does not
    assert pareto_frontier([a, b, c, d, e, f]) == [e, d, a]
    assert pareto_frontier([f, a]) == [a]  # the same score for more bytes is not on it
    assert pareto_frontier([_p("big", 100, 0.5), _p("small", 10, 0.9)]) == [_p("small", 10, 0.9)]


def test_ties_in_bytes_keep_the_higher_score_and_equal_points_the_first_label() -> None:
    low, high = _p("low", 10, 0.4), _p("high", 10, 0.6)
    assert pareto_frontier([low, high]) == [high]
    assert pareto_frontier([_p("y", 10, 0.5), _p("x", 10, 0.5)]) == [_p("x", 10, 0.5)]


def test_no_points_no_frontier_and_one_point_is_its_own_frontier() -> None:
    assert pareto_frontier([]) == []
    assert pareto_frontier([_p("only", 3, 0.0)]) == [_p("only", 3, 0.0)]


def test_the_staircase_is_level_until_the_next_point_and_reaches_the_right_edge() -> None:
    frontier = [_p("e", 10, 0.2), _p("d", 25, 0.8), _p("a", 100, 0.9)]
    assert frontier_step(frontier, 200.0) == ([10.0, 25.0, 100.0, 200.0], [20.0, 80.0, 90.0, 90.0])
    assert frontier_step(frontier, 100.0) == ([10.0, 25.0, 100.0], [20.0, 80.0, 90.0])
    assert frontier_step([], 5.0) == ([], [])


def _quantized_rows() -> list[dict]:
    """none and knorm 0.5, each at full precision and 4 bits, 8 questions each; bytes and scores chosen by hand."""
    quant = {"kv_bits": 4, "kv_group_size": 32, "kv_residual": 64}
    cells = [  # (method, ratio, extra fields, KV bytes kept, questions answered right of 8)
        ("none", 0.0, {}, 8 * MIB, 8),
        ("none", 0.0, quant, 2 * MIB, 7),
        ("knorm", 0.5, {}, 4 * MIB, 5),
        ("knorm", 0.5, quant, 1 * MIB, 6),
    ]
    return [answer_row(m, r, float(i < right), i, kv_bytes_after=kv, **extra)
            for m, r, extra, kv, right in cells for i in range(8)]  # fmt: skip


def test_every_cell_is_a_point_labelled_with_its_bits() -> None:
    s = summarize(_quantized_rows())
    assert s.methods == ["none", "none@4bit", "knorm", "knorm@4bit"]
    got = {(p.label, p.method, p.ratio, p.kv_bits, p.kv_bytes / MIB, p.score) for p in points(s)}
    assert got == {("none", "none", 0.0, None, 8.0, 1.0), ("none@4bit", "none", 0.0, 4, 2.0, 0.875),
                   ("knorm", "knorm", 0.5, None, 4.0, 0.625), ("knorm@4bit", "knorm", 0.5, 4, 1.0, 0.75)}  # fmt: skip
    assert [p.label for p in pareto_frontier(points(s))] == ["knorm@4bit", "none@4bit", "none"]
    assert ("none@4bit", 0.0) in s.tests  # the quantized uncompressed cell is tested against 'none'


def test_the_report_has_a_frontier_table() -> None:
    s = summarize(_quantized_rows())
    ((header, body),) = [(h, b) for t, h, b in tables(s) if t.startswith("Frontier")]
    assert header == ["method", "ratio", "bits", "KV MiB", "of 'none'", "average"]
    # Wilson 95%: 6/8 -> [40.9, 92.9], 7/8 -> [52.9, 97.8], 8/8 -> [67.6, 100]
    assert body == [["knorm@4bit", "0.5", "4", "1.000", "0.125", "75.0 [40.9, 92.9]"],
                    ["none@4bit", "0", "4", "2.000", "0.250", "87.5 [52.9, 97.8]"],
                    ["none", "0", "full", "8.000", "1.000", "100.0 [67.6, 100.0]"]]  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")  # matplotlib: a log axis with one point
def test_the_frontier_plot_draws_the_intervals(tmp_path: Path) -> None:
    """Two summaries that differ only in their intervals give different frontier plots (error bars)."""
    s = summarize(_quantized_rows())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = report.plot(s, tmp_path / "a")[-1]
    for cell in s.cells.values():
        cell.interval = Interval(max(0.0, cell.average - 0.3), min(1.0, cell.average + 0.3), "wilson")
    second = report.plot(s, tmp_path / "b")[-1]
    assert first.name == second.name == "score_vs_kv_mib.png"
    assert first.read_bytes().startswith(b"\x89PNG") and first.read_bytes() != second.read_bytes()
