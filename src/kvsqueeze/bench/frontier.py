"""Score against bytes: every cell of a benchmark as a point (KV bytes kept, mean score) and the Pareto frontier, the
points that hold the highest score for at most their number of bytes. It answers "for this many bytes, what should I
keep and at how many bits?" across methods, ratios and the quantization axis at once.

A point is on the frontier when every point with fewer or as many bytes scores lower: sorted by bytes (ties: the
higher score first), a point joins when its score beats the best one so far. Among points of equal bytes and equal
score the first in (label, ratio) order stands for them. The frontier uses mean scores only; with a few dozen
questions per cell, a neighbour's interval often overlaps, so the report draws the intervals next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvsqueeze.bench.statistics import Interval
from kvsqueeze.bench.summary import Summary

MIB = 2**20


@dataclass(frozen=True)
class Point:
    """One (method, ratio, bits) cell: the mean KV bytes it kept and its mean score in [0, 1]."""

    label: str  # the cell's label in the report, e.g. 'knorm@4bit'
    method: str  # its method's label, e.g. 'knorm'
    ratio: float
    kv_bits: int | None  # None: full precision
    kv_bytes: float
    score: float
    interval: Interval | None = None  # of `score`


def points(summary: Summary) -> list[Point]:
    """Every cell of `summary` as a point, in the report's order (methods, then ratios)."""
    return [
        Point(m, c.method or m, r, c.kv_bits, c.kv_after, c.average, c.interval)
        for m in summary.methods
        for r in summary.ratios
        if (c := summary.cells.get((m, r))) is not None
    ]


def pareto_frontier(candidates: Sequence[Point]) -> list[Point]:
    """The points that score higher than every other point holding at most as many bytes, by increasing bytes (so
    by increasing score). Empty for no points."""
    best: float | None = None
    out = []
    for p in sorted(candidates, key=lambda p: (p.kv_bytes, -p.score, p.label, p.ratio)):
        if best is None or p.score > best:
            out.append(p)
            best = p.score
    return out


def frontier_step(frontier: Sequence[Point], right: float) -> tuple[list[float], list[float]]:
    """(x, y) of the frontier as a staircase in MiB and %: the best score reached for at most x bytes, level until the
    next frontier point, drawn on to `right` (MiB)."""
    xs = [p.kv_bytes / MIB for p in frontier]
    ys = [100 * p.score for p in frontier]
    if frontier and right > xs[-1]:
        xs, ys = [*xs, right], [*ys, ys[-1]]
    return xs, ys


def draw(ax: Any, all_points: Sequence[Point], frontier: Sequence[Point]) -> None:
    """Draw on a matplotlib Axes (object API, no pyplot): every point with its interval as an error bar, one colour
    per method and one marker per bits value, and the frontier as a staircase with its points ringed."""
    bases = list(dict.fromkeys(p.method for p in all_points))
    bits = list(dict.fromkeys(p.kv_bits for p in all_points))
    markers = "osD^v<>ph*"
    colours = [f"C{i % 10}" for i in range(len(bases))]
    for p in all_points:
        y = 100 * p.score
        low, high = (p.interval.low, p.interval.high) if p.interval is not None else (p.score, p.score)
        colour, marker = colours[bases.index(p.method)], markers[bits.index(p.kv_bits) % len(markers)]
        ax.errorbar([p.kv_bytes / MIB], [y], yerr=[[y - 100 * low], [100 * high - y]], color=colour, marker=marker,
                    markersize=5, capsize=2, elinewidth=0.8, alpha=0.8, linestyle="none")  # fmt: skip
    for base, colour in zip(bases, colours, strict=True):  # legend: one entry per method and one per bits value
        ax.plot([], [], color=colour, marker="o", linestyle="none", label=base)
    for b in bits:
        ax.plot([], [], color="grey", marker=markers[bits.index(b) % len(markers)], linestyle="none",
                label="full precision" if b is None else f"{b} bits")  # fmt: skip
    right = max((p.kv_bytes / MIB for p in all_points), default=0.0)
    xs, ys = frontier_step(frontier, right)
    ax.step(xs, ys, where="post", color="black", linewidth=1.2, label="frontier")
    ax.scatter([p.kv_bytes / MIB for p in frontier], [100 * p.score for p in frontier], s=90, facecolors="none",
               edgecolors="black", linewidths=1.2)  # fmt: skip
    for p in frontier:
        ax.annotate(f"{p.label} {p.ratio:g}", (p.kv_bytes / MIB, 100 * p.score), textcoords="offset points",
                    xytext=(4, 4), fontsize=6)  # fmt: skip
