"""What the report says, computed from result rows: per (method, ratio) cell the scores per task and length with
their 95% intervals, the paired test of each compressed cell against the uncompressed one on the same questions,
the ranking of the compressed cells at each ratio (each against the next one down, on the same questions), and
scores broken down by what varied tasks record about each sample (haystack source, needle phrasing, value format).
Nothing here is stored per row: intervals and tests are computed from the rows every time.

Rows whose cache was quantized (`kv_bits`) form cells of their own, labelled e.g. `knorm@4bit` (with the group size
and residual too, `knorm@4bit/g32r64`, where the rows hold more than one such setting); full-precision rows keep the
method's own label.

Scores are RULER string-match scores in [0, 1], averaged per task, then over tasks (each task weighs the same). Time
and memory figures come from the runner's cost pass (one real run per method, ratio and length), averaged over
lengths.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from kvsqueeze.bench.results import NONE
from kvsqueeze.bench.statistics import Interval, PairedTest, paired_test, score_interval

BREAKDOWNS = ("source", "phrasing", "format")  # sample_meta fields the report breaks scores down by
QuestionKey = tuple[str, int, Any, Any, Any]  # task, context length, sample, question index, content hash


@dataclass(frozen=True)
class Score:
    """A mean score in [0, 1] (mean over tasks of the per-task means), its 95% interval and its number of rows."""

    mean: float
    interval: Interval
    rows: int


@dataclass
class Cell:
    """The aggregate of one (method, ratio): scores per task and length, mean bytes and cost figures."""

    scores: dict[str, float]  # task -> mean score in [0, 1]
    by_length: dict[int, float]  # context length -> mean score over tasks
    kv_before: float
    kv_after: float
    prefill_s: float
    compression_s: float
    decode_tps: float
    peak_bytes: float
    rows: int
    interval: Interval  # of `average`
    task_intervals: dict[str, Interval]
    length_intervals: dict[int, Interval]
    questions: dict[QuestionKey, float] = field(default_factory=dict, repr=False)  # for the paired tests
    kv_bits: int | None = None  # the bits its cache was quantized to (None: full precision)
    method: str = ""  # the method's label without the quantization suffix ('knorm' for 'knorm@4bit')

    @property
    def average(self) -> float:
        return mean(self.scores.values())


@dataclass
class Summary:
    cells: dict[tuple[str, float], Cell]  # (method label, ratio) -> aggregate
    methods: list[str]  # labels in first-seen order, 'none' first
    ratios: list[float]
    tasks: list[str]
    lengths: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    tests: dict[tuple[str, float], PairedTest] = field(default_factory=dict)  # compressed cell vs 'none'
    task_tests: dict[tuple[str, float, str], PairedTest] = field(default_factory=dict)  # the same, per task
    # at each compression ratio, the compressed cells by decreasing average score, each with its paired test against
    # the next one down on the questions both answered (None for the last): the ranking and which steps of it hold
    rankings: dict[float, list[tuple[str, PairedTest | None]]] = field(default_factory=dict)
    breakdowns: dict[str, dict[tuple[str, float], dict[str, Score]]] = field(default_factory=dict)


def method_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """method repr -> a short label: the registry name, or the repr without its ratio where options differ."""
    strip = {r["method"]: re.sub(r"ratio=[^,()]*(, )?", "", r["method"]).replace(", )", ")") for r in rows}
    variants: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        variants[r.get("method_name", r["method"])].add(strip[r["method"]])
    return {
        r["method"]: (r.get("method_name", r["method"]) if len(variants[r.get("method_name", r["method"])]) == 1
                      else strip[r["method"]])
        for r in rows
    }  # fmt: skip


def quant_suffix(row: dict[str, Any], detailed: bool = False) -> str:
    """'' for a full-precision row (kv_bits None or absent), '@4bit' for a 4-bit one; `detailed` adds the group size
    and residual: '@4bit/g32r64'."""
    bits = row.get("kv_bits")
    if bits is None:
        return ""
    return f"@{bits}bit" + (f"/g{row.get('kv_group_size')}r{row.get('kv_residual')}" if detailed else "")


def row_labels(rows: list[dict[str, Any]]) -> list[str]:
    """The label of each row's cell: its method's label (`method_labels`) and its quantization (`quant_suffix`, with
    the group settings when the quantized rows hold more than one)."""
    labels = method_labels(rows)
    settings = {(r.get("kv_group_size"), r.get("kv_residual")) for r in rows if r.get("kv_bits") is not None}
    return [labels[r["method"]] + quant_suffix(r, len(settings) > 1) for r in rows]


def question_key(row: dict[str, Any]) -> QuestionKey:
    """What pairs a compressed row with the uncompressed row of the same question (one run per results folder)."""
    return (row["task"], int(row["context_length"]), row.get("sample"), row.get("question_index"), row.get("content"))


def summarize(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Summary:
    if not rows:
        raise ValueError("no result rows to report")
    labels, bases = row_labels(rows), method_labels(rows)
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for label, r in zip(labels, rows, strict=True):
        groups[(label, float(r["ratio"]))].append(r)
    cells = {key: _cell(rs, bases[rs[0]["method"]]) for key, rs in groups.items()}
    methods = _ordered(labels, [bases[r["method"]] for r in rows], [r.get("kv_bits") for r in rows])
    summary = Summary(
        cells=cells,
        methods=methods,
        ratios=sorted({k[1] for k in cells}),
        tasks=sorted({r["task"] for r in rows}),
        lengths=sorted({int(r["context_length"]) for r in rows}),
        meta=meta or {},
    )
    _compare(summary)
    _rank(summary)
    summary.breakdowns = {dim: by for dim in BREAKDOWNS if (by := _breakdown(rows, labels, dim))}
    return summary


def _ordered(labels: list[str], bases: list[str], bits: list[int | None]) -> list[str]:
    """Cell labels (one per row, with each row's method label and bits): 'none' first, then methods in first-seen
    order; each method at full precision, then at fewer and fewer bits."""
    base_of, bits_of = dict(zip(labels, bases, strict=True)), dict(zip(labels, bits, strict=True))
    order = list(dict.fromkeys(bases))

    def key(label: str) -> tuple[bool, int, int]:
        b = bits_of[label]
        return (base_of[label] != NONE, order.index(base_of[label]), -(b if b is not None else 1 << 30))

    return sorted(dict.fromkeys(labels), key=key)


def mean_of_task_means(per_task: dict[str, list[float]]) -> Score:
    """The score of rows grouped by task: the mean of the task means, with its interval."""
    groups = [per_task[t] for t in sorted(per_task)]
    return Score(mean(mean(g) for g in groups), score_interval(groups), sum(len(g) for g in groups))


def _cell(rows: list[dict[str, Any]], method: str) -> Cell:
    per_task: dict[str, list[float]] = defaultdict(list)
    per_length: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per_task[r["task"]].append(float(r["score"]))
        per_length[int(r["context_length"])][r["task"]].append(float(r["score"]))
    costs = list({r.get("group", r["context_length"]): r for r in rows}.values())  # one cost pass per length
    by_length = {n: mean_of_task_means(tasks) for n, tasks in per_length.items()}
    return Cell(
        scores={t: mean(v) for t, v in per_task.items()},
        by_length={n: s.mean for n, s in by_length.items()},
        kv_before=mean(float(r["kv_bytes_before"]) for r in rows),
        kv_after=mean(float(r["kv_bytes_after"]) for r in rows),
        prefill_s=mean(float(r["prefill_seconds"]) for r in costs),
        compression_s=mean(float(r["compression_seconds"]) for r in costs),
        decode_tps=mean(float(r["decode_tokens_per_second"]) for r in costs),
        peak_bytes=mean(float(r["peak_memory_bytes"]) for r in costs),
        rows=len(rows),
        interval=mean_of_task_means(per_task).interval,
        task_intervals={t: score_interval([v]) for t, v in per_task.items()},
        length_intervals={n: s.interval for n, s in by_length.items()},
        questions={question_key(r): float(r["score"]) for r in rows},
        kv_bits=rows[0].get("kv_bits"),
        method=method,
    )


def _compare(s: Summary) -> None:
    """Each compressed cell against 'none' on the questions both answered: over all tasks and per task."""
    base = next((c for (m, _), c in s.cells.items() if m == NONE), None)
    if base is None:
        return
    for (m, r), cell in s.cells.items():
        shared = [k for k in cell.questions if k in base.questions]
        if m == NONE or not shared:
            continue
        s.tests[(m, r)] = _paired(base, cell, shared)
        for task in sorted({k[0] for k in shared}):
            s.task_tests[(m, r, task)] = _paired(base, cell, [k for k in shared if k[0] == task])


def _rank(s: Summary) -> None:
    """At each ratio with two or more compressed cells: the cells by decreasing average score (ties in the order of
    `s.methods`), each tested against the next one down (`paired_test(lower, upper)`: a positive difference is the
    upper one's lead)."""
    for ratio in s.ratios:
        labels = [m for m in s.methods if m != NONE and (m, ratio) in s.cells]
        if len(labels) < 2:
            continue
        ordered = sorted(labels, key=lambda m: -s.cells[(m, ratio)].average)  # stable: ties keep s.methods' order
        ranking: list[tuple[str, PairedTest | None]] = []
        for upper, lower in zip(ordered, [*ordered[1:], None], strict=True):
            test = None
            if lower is not None:
                a, b = s.cells[(lower, ratio)], s.cells[(upper, ratio)]
                shared = [k for k in b.questions if k in a.questions]
                test = _paired(a, b, shared) if shared else None
            ranking.append((upper, test))
        s.rankings[ratio] = ranking


def _paired(base: Cell, cell: Cell, keys: list[QuestionKey]) -> PairedTest:
    return paired_test([base.questions[k] for k in keys], [cell.questions[k] for k in keys])


def _breakdown(rows: list[dict[str, Any]], labels: list[str], dim: str) -> dict[tuple[str, float], dict[str, Score]]:
    """(method, ratio) -> value of sample_meta[dim] -> score, over the rows whose samples record `dim`."""
    grouped: dict[tuple[str, float], dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for label, r in zip(labels, rows, strict=True):
        meta = r.get("sample_meta")
        if isinstance(meta, dict) and dim in meta:
            grouped[(label, float(r["ratio"]))][str(meta[dim])][r["task"]].append(float(r["score"]))
    return {cell: {v: mean_of_task_means(by[v]) for v in sorted(by)} for cell, by in grouped.items()}
