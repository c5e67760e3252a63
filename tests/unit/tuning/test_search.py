"""The monotone search over ratios, on evaluation functions whose answer is known."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvsqueeze.tuning.search import check_grid, linear_grid, max_evaluations, search

GRID = linear_grid()


def curve(knee: float):
    """A monotone accuracy curve: 1.0 up to `knee`, then falling linearly."""
    return lambda r: 1.0 if r <= knee + 1e-9 else max(0.0, 1.0 - 2 * (r - knee))


@pytest.mark.parametrize("knee", [0.1, 0.35, 0.5, 0.8, 0.9])
def test_finds_the_highest_ratio_meeting_the_target(knee: float) -> None:
    calls: list[float] = []

    def evaluate(r: float) -> float:
        calls.append(r)
        return curve(knee)(r)

    result = search(GRID, evaluate, lambda s: s >= 0.99)
    assert result.best == max(r for r in GRID if r <= knee + 1e-9)
    assert len(calls) == result.evaluations <= max_evaluations(len(GRID)) == 4  # 9 grid points: 4, not 9
    assert len(set(calls)) == len(calls)


def test_none_when_even_the_smallest_ratio_fails() -> None:
    result = search(GRID, lambda r: 0.0, lambda s: s >= 0.5)
    assert result.best is None
    assert all(not ok for _, _, ok in result.probes)


@given(st.integers(min_value=1, max_value=40), st.data())
def test_any_monotone_threshold_is_found_in_log_probes(n: int, data: st.DataObject) -> None:
    grid = [round((i + 1) / (n + 1), 6) for i in range(n)]
    k = data.draw(st.integers(min_value=-1, max_value=n - 1))  # last index meeting the target (-1: none)
    result = search(grid, lambda r: grid.index(r) <= k, bool)
    assert result.best == (grid[k] if k >= 0 else None)
    assert result.evaluations <= max_evaluations(n)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([], "empty"),
        ([0.5, 0.3], "increasing"),
        ([0.0, 0.5], "baseline"),
        ([0.5, 1.0], "ratio"),
        ([0.2, 0.2], "increasing"),
    ],
)
def test_bad_grids_are_refused(grid: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_grid(grid)


def test_linear_grid() -> None:
    assert linear_grid() == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert linear_grid(0.25, 0.75, 0.25) == (0.25, 0.5, 0.75)
    with pytest.raises(ValueError, match="step"):
        linear_grid(step=0)
