"""The monotone search over compression ratios, as a pure function of an evaluation callback.

Quality is assumed to fall as the ratio grows: if a ratio meets the target, every smaller one does. The highest grid
ratio that meets it is then found by bisection over the grid, in at most ceil(log2(len(grid) + 1)) evaluations,
instead of one per grid point. Ratio 0 (no compression) is taken to meet the target and is never evaluated. A
callback that is not monotone still gets an answer: a ratio that met the target, with no evaluated ratio above it
that met it being skipped — the answer is then a lower bound of what a full grid would find.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvsqueeze.validation import check_ratio

P = TypeVar("P")  # what one evaluation returns (a probe's scores, interval, bytes ...)


@dataclass
class SearchResult(Generic[P]):
    """The highest grid ratio found to meet the target (None: not even the smallest does), and every evaluation
    made, in the order they were made."""

    best: float | None
    probes: list[tuple[float, P, bool]] = field(default_factory=list)  # (ratio, evaluation, met the target)

    @property
    def evaluations(self) -> int:
        return len(self.probes)


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """`grid` as a tuple of strictly increasing ratios in (0, 1); ValueError naming the bad value otherwise."""
    out = tuple(float(r) for r in grid)
    if not out:
        raise ValueError("the ratio grid is empty; give at least one ratio in (0, 1)")
    for r in out:
        check_ratio(r)
        if r == 0.0:
            raise ValueError("the ratio grid holds 0 (no compression), which is the baseline; give ratios in (0, 1)")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ValueError(f"the ratio grid must be strictly increasing, got {list(out)}")
    return out


def max_evaluations(n: int) -> int:
    """The most evaluations `search` makes on a grid of `n` ratios."""
    return math.ceil(math.log2(n + 1)) if n > 0 else 0


def search(grid: Sequence[float], evaluate: Callable[[float], P], meets: Callable[[P], bool]) -> SearchResult[P]:
    """The highest ratio of `grid` whose evaluation `meets` the target, by bisection (see the module docstring)."""
    ratios = check_grid(grid)
    result: SearchResult[P] = SearchResult(best=None)
    low, high = -1, len(ratios)  # invariant: ratios[low] meets (-1: ratio 0), ratios[high] does not (len: none known)
    while high - low > 1:
        mid = (low + high) // 2
        evaluation = evaluate(ratios[mid])
        ok = bool(meets(evaluation))
        result.probes.append((ratios[mid], evaluation, ok))
        if ok:
            low = mid
        else:
            high = mid
    result.best = ratios[low] if low >= 0 else None
    return result


def linear_grid(start: float = 0.1, stop: float = 0.9, step: float = 0.1) -> tuple[float, ...]:
    """start, start + step, ... up to stop (inclusive), rounded to 6 digits: the default grid is 0.1 ... 0.9."""
    if step <= 0:
        raise ValueError(f"the grid step must be positive, got {step}")
    n = math.floor((stop - start) / step + 1e-9) + 1
    return check_grid([round(start + i * step, 6) for i in range(max(n, 0))])
