"""The report's numbers from result rows: intervals per cell, task and length, the paired test of every compressed
cell against 'none' on the same questions, and the breakdown by what varied tasks record per sample."""

from __future__ import annotations

import pytest

from kvsqueeze.bench.statistics import wilson
from kvsqueeze.bench.summary import question_key, summarize
from tests.unit.bench.report_rows import answer_row, rows, scored_rows

LOST_SIX = {("none", 0.0): [1.0] * 10, ("knorm", 0.5): [1.0] * 4 + [0.0] * 6, ("snapkv", 0.5): [1.0] * 9 + [0.0]}


def test_zero_one_scores_get_wilson_intervals_per_cell_task_and_length() -> None:
    s = summarize(scored_rows(LOST_SIX))
    knorm = s.cells[("knorm", 0.5)]
    assert knorm.average == pytest.approx(0.4)
    assert knorm.interval == knorm.task_intervals["niah"] == knorm.length_intervals[64] == wilson(4, 10)
    assert s.cells[("none", 0.0)].interval.low == pytest.approx(10 / (10 + 1.959963984540054**2))


def test_each_compressed_cell_is_tested_against_none_on_the_same_questions() -> None:
    s = summarize(scored_rows(LOST_SIX))
    knorm, snapkv = s.tests[("knorm", 0.5)], s.tests[("snapkv", 0.5)]
    assert (knorm.test, knorm.pairs, knorm.better, knorm.worse) == ("mcnemar", 10, 0, 6)
    assert knorm.p_value == pytest.approx(2 * 0.5**6) and knorm.significant
    assert snapkv.p_value == 1.0 and not snapkv.significant
    assert ("none", 0.0) not in s.tests
    assert s.task_tests[("knorm", 0.5, "niah")] == knorm  # one task: the same test


def test_pairs_are_matched_by_question_not_by_order() -> None:
    none = [answer_row("none", 0.0, float(i % 2), i) for i in range(8)]
    knorm = [answer_row("knorm", 0.5, float(i % 2), i) for i in reversed(range(8))]  # same scores, other order
    test = summarize(none + knorm).tests[("knorm", 0.5)]
    assert (test.better, test.worse, test.p_value) == (0, 0, 1.0)
    assert question_key(none[3]) == question_key(knorm[4])


def test_only_questions_both_cells_answered_are_paired() -> None:
    rs = scored_rows({("none", 0.0): [1.0] * 4, ("knorm", 0.5): [0.0] * 6})  # questions 4, 5: no baseline
    assert summarize(rs).tests[("knorm", 0.5)].pairs == 4


def test_partial_credit_gets_a_bootstrap_interval_and_the_sign_flip_test() -> None:
    rs = scored_rows({("none", 0.0): [1.0, 0.75, 1.0, 0.5] * 3, ("knorm", 0.5): [0.5, 0.75, 0.25, 0.5] * 3})
    s = summarize(rs)
    cell = s.cells[("knorm", 0.5)]
    assert cell.interval.method == "bootstrap" and cell.interval.low < cell.average < cell.interval.high
    assert s.tests[("knorm", 0.5)].test == "sign-flip"
    assert s.tests[("knorm", 0.5)].p_value == pytest.approx(2 / 2**6)  # six losses, exact enumeration
    assert summarize(rs).cells[("knorm", 0.5)].interval == cell.interval  # deterministic


def test_without_none_rows_there_is_no_paired_test() -> None:
    s = summarize([r for r in rows() if r["method_name"] != "none"])
    assert s.tests == {} and s.task_tests == {}


def test_breakdown_by_sample_meta_fields() -> None:
    rs = []
    for i in range(8):
        meta = {"source": "prose" if i < 4 else "python_docs", "phrasing": f"p{i % 2}", "depth": 0.5}
        rs += [answer_row("none", 0.0, 1.0, i, sample_meta=meta), answer_row("knorm", 0.5, float(i < 4), i,
                                                                                sample_meta=meta)]  # fmt: skip
    s = summarize(rs)
    assert set(s.breakdowns) == {"source", "phrasing"}  # depth is not a breakdown field; format is absent
    by_source = s.breakdowns["source"][("knorm", 0.5)]
    assert list(by_source) == ["prose", "python_docs"]
    assert (by_source["prose"].mean, by_source["python_docs"].mean) == (1.0, 0.0)
    assert by_source["prose"].interval == wilson(4, 4) and by_source["prose"].rows == 4
    assert s.breakdowns["phrasing"][("knorm", 0.5)]["p0"].mean == 0.5


def test_rows_without_sample_meta_give_no_breakdown() -> None:
    assert summarize(rows()).breakdowns == {}
    assert summarize([answer_row("none", 0.0, 1.0, 0, sample_meta="not a dict")]).breakdowns == {}


def test_quantized_rows_form_cells_of_their_own_and_never_mix() -> None:
    """Rows at other bits, or at the same bits with other group settings, are other cells; rows without kv_bits (an
    older results file) are full precision."""
    g32, g64 = {"kv_group_size": 32, "kv_residual": 64}, {"kv_group_size": 64, "kv_residual": 0}
    rs = [answer_row("knorm", 0.5, 1.0, 0), answer_row("knorm", 0.5, 0.0, 0, kv_bits=None),
          answer_row("knorm", 0.5, 1.0, 0, kv_bits=2, **g32),
          answer_row("knorm", 0.5, 0.0, 0, kv_bits=4, **g32)]  # fmt: skip
    s = summarize(rs)
    assert s.methods == ["knorm", "knorm@4bit", "knorm@2bit"]  # full precision, then fewer and fewer bits
    assert s.cells[("knorm", 0.5)].rows == 2 and s.cells[("knorm", 0.5)].kv_bits is None
    assert s.cells[("knorm@2bit", 0.5)].kv_bits == 2 and s.cells[("knorm@2bit", 0.5)].method == "knorm"
    s = summarize([*rs, answer_row("knorm", 0.5, 1.0, 0, kv_bits=4, **g64)])
    assert s.methods == ["knorm", "knorm@4bit/g32r64", "knorm@4bit/g64r0", "knorm@2bit/g32r64"]
    assert s.cells[("knorm@4bit/g64r0", 0.5)].average == 1.0 and s.cells[("knorm@4bit/g32r64", 0.5)].average == 0.0


def test_each_ratio_ranks_its_methods_and_tests_each_against_the_next_one_down() -> None:
    scores = {
        ("none", 0.0): [1.0] * 10,
        ("snapkv", 0.5): [1.0] * 10,
        ("knorm", 0.5): [1.0] * 4 + [0.0] * 6,  # loses six questions snapkv answers, wins none
        ("knorm", 0.25): [1.0] * 10,  # alone at its ratio: no ranking there
    }
    s = summarize(scored_rows(scores))
    assert 0.25 not in s.rankings and 0.0 not in s.rankings
    (top, lead), (bottom, last) = s.rankings[0.5]
    assert (top, bottom, last) == ("snapkv", "knorm", None)
    assert lead is not None and (lead.pairs, lead.better, lead.worse) == (10, 6, 0)
    assert lead.difference == pytest.approx(0.6) and lead.p_value == pytest.approx(2 * 0.5**6) and lead.significant


def test_a_tie_keeps_the_order_methods_were_seen_in_and_is_not_significant() -> None:
    scores = {("knorm", 0.5): [1.0, 0.0, 1.0, 0.0], ("snapkv", 0.5): [0.0, 1.0, 0.0, 1.0]}
    (first, test), (second, _) = summarize(scored_rows(scores)).rankings[0.5]
    assert (first, second) == ("knorm", "snapkv")
    assert test is not None and (test.better, test.worse, test.p_value) == (2, 2, 1.0) and not test.significant
