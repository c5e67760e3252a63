"""The tune / held-out split: deterministic, whole samples, independent of order, written as a dataset file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.bench.dataset import load_dataset
from kvsqueeze.bench.tasks import Sample
from kvsqueeze.tuning.split import split_samples, write_split


def samples(n: int) -> list[Sample]:
    return [Sample("t", i, f"context {i}", (f"q{i}", f"r{i}"), ((str(i),), ("x",)), metric="any") for i in range(n)]


def test_split_is_deterministic_disjoint_and_order_free() -> None:
    tune, held = split_samples(samples(20), 0.5, seed=3)
    again = split_samples(list(reversed(samples(20))), 0.5, seed=3)
    assert [s.context for s in tune] == [s.context for s in again[0]]
    assert len(tune) == len(held) == 10
    assert {s.context for s in tune}.isdisjoint({s.context for s in held})
    other = split_samples(samples(20), 0.5, seed=4)[0]
    assert {s.context for s in other} != {s.context for s in tune}  # the seed changes the split


def test_both_sides_non_empty_and_bad_inputs() -> None:
    tune, held = split_samples(samples(2), 0.9)
    assert len(tune) == len(held) == 1
    with pytest.raises(ValueError, match="at least 2 samples"):
        split_samples(samples(1))
    with pytest.raises(ValueError, match=r"tune_fraction must be in \(0, 1\), got 1.0"):
        split_samples(samples(4), 1.0)


def test_written_split_reads_back_as_a_dataset(tmp_path: Path) -> None:
    path = write_split(samples(3), tmp_path / "tune_split.jsonl")
    back = load_dataset(path)
    assert [s.context for s in back] == ["context 0", "context 1", "context 2"]
    assert back[1].questions == ("q1", "r1") and back[1].answers == (("1",), ("x",))
    before = path.stat().st_mtime_ns
    write_split(samples(3), path)
    assert path.stat().st_mtime_ns == before  # unchanged content: not rewritten
