"""The files of a results folder: strict reading (a malformed line names the file and line), the one tolerated
damage (a last line cut by a hard kill), row keys that carry the run and the question's content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.bench.results import (
    COSTS,
    RESULTS,
    SUPERSEDED,
    Appender,
    ResultsError,
    content_hash,
    cost_key,
    drop_cut_line,
    read_jsonl,
    read_run,
    row_key,
    supersede,
)

RUN = "0123456789ab"


def _row(**kw) -> dict:
    row = {"run": RUN, "content": "c" * 16, "task": "fake", "context_length": 48, "sample": 0, "question_index": 0,
           "method": "none", "ratio": 0.0, "seed": 0, "query_aware": False, "group": "48"}  # fmt: skip
    return {**row, **kw}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{}", "line 2: not a row of this file: field 'run' is missing"),
        (json.dumps({**_row(), "ratio": "half"}), "line 2: not a row of this file: could not convert"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ('{"task": "fake", ', "line 2: not valid JSON"),  # damaged, but not the last line: not an interrupted write
    ],
)
def test_a_malformed_line_names_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / RESULTS, [_row(), line, _row(sample=1)])
    with pytest.raises(ResultsError, match=rf"results\.jsonl: {message}"):
        read_jsonl(path, key=row_key)


def test_a_cost_row_missing_a_field_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / COSTS, [_row(), {k: v for k, v in _row().items() if k != "group"}])
    with pytest.raises(ResultsError, match=r"costs\.jsonl: line 2: not a row of this file: field 'group' is missing"):
        read_jsonl(path, key=cost_key)


def test_rows_of_another_run_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / RESULTS, [_row(), _row(run="ffffffffffff")])
    with pytest.raises(ResultsError, match=r"results\.jsonl: line 2: .*belongs to run 'ffffffffffff', not .*'0123"):
        read_run(tmp_path, RUN)


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / RESULTS).write_bytes(b'{"task": "\xe4"}\n')
    with pytest.raises(ResultsError, match=r"results\.jsonl: not UTF-8"):
        read_jsonl(tmp_path / RESULTS)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), cut=st.integers(1, 60), data=st.data())
def test_a_cut_last_line_is_dropped_and_the_file_repaired(tmp_path_factory, n: int, cut: int, data) -> None:
    """Whatever length a hard kill leaves of the last row, reading skips it, drop_cut_line removes exactly it, and
    an append after that leaves a file every line of which is a row."""
    path = tmp_path_factory.mktemp("cut") / RESULTS
    rows = [_row(sample=i, question=data.draw(st.text(max_size=20))) for i in range(n)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    last = len(json.dumps(rows[-1])) + 1
    cut = min(max(cut, 2), last - 1)  # the newline and at least one character of the row, not all of it
    path.write_text(text[: len(text) - cut])
    assert read_jsonl(path, key=row_key) == rows[:-1]
    assert drop_cut_line(path) is True
    assert path.read_text() == text[: len(text) - last]
    appender = Appender(path)
    appender.write(rows[-1])
    appender.close()
    assert read_jsonl(path, key=row_key) == rows and path.read_text() == text


def test_a_complete_last_row_without_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / RESULTS
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(_row(sample=1)))
    assert drop_cut_line(path) is False and len(read_jsonl(path, key=row_key)) == 2
    appender = Appender(path)  # adds the missing newline first
    appender.write(_row(sample=2))
    appender.close()
    assert [r["sample"] for r in read_jsonl(path, key=row_key)] == [0, 1, 2]


CONTENT = st.tuples(
    st.lists(st.integers(0, 50_000), min_size=1, max_size=30),
    st.text(max_size=30),
    st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3),
    st.sampled_from(["all", "any"]),
    st.integers(1, 512),
)


@settings(max_examples=200, deadline=None)
@given(a=CONTENT, b=CONTENT)
def test_content_hash_changes_with_any_part_of_the_question(a: tuple, b: tuple) -> None:
    assert (content_hash(*a) == content_hash(*b)) == (a == b)


def test_keys_hold_the_run_and_the_content() -> None:
    assert row_key(_row()) != row_key(_row(run="ffffffffffff"))
    assert row_key(_row()) != row_key(_row(content="d" * 16))
    assert cost_key(_row()) != cost_key(_row(run="ffffffffffff"))
    assert cost_key(_row()) == cost_key(_row(content="d" * 16, sample=3))  # one cost pass per group


def test_supersede_moves_rows_out_of_results(tmp_path: Path) -> None:
    rows = [_row(sample=i) for i in range(4)]
    _write(tmp_path / RESULTS, rows)
    kept = supersede(tmp_path, rows, lambda r: r["sample"] % 2 == 1)
    assert kept == rows[::2] == read_jsonl(tmp_path / RESULTS, key=row_key)
    assert read_jsonl(tmp_path / SUPERSEDED) == rows[1::2]
    assert supersede(tmp_path, kept, lambda r: False) == kept
