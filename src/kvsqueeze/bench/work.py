"""One work unit of the benchmark: a context with every cell (method, ratio) and bits still to compute on it.

`plan_work` turns the grid's units into work units, leaving out what a results folder already holds; an `Evaluator`
(one per process that holds the model: the driver of a serial run, each Ray actor) computes a work unit and yields
`Event`s as it goes: a cost row, a result row, a shared prefill. Every cell of a context answers from one recorded
prefill (`recording.record`), taken on first use and dropped when the unit ends.

Result rows come out without their cost figures (prefill and compression time, decoding speed, peak memory) and
without `versions`: those are the cost pass's, one per (method, ratio, group), which another process may be
computing, so the driver adds them (`writer.RowWriter`) before the row is written. Which unit runs which cost pass
is fixed by the plan (the first unit of its group that has the cell, as a serial run always did), so a serial run and
a distributed one compute the same rows the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.memory import PeakMemory
from kvsqueeze.bench.metrics import score
from kvsqueeze.bench.recordings import RecordingStore
from kvsqueeze.bench.results import NONE, Row, cost_key, row_key
from kvsqueeze.bench.units import Unit, cell_query_aware, with_question
from kvsqueeze.cache import KVCache
from kvsqueeze.generation import answer
from kvsqueeze.memory import cache_stats
from kvsqueeze.methods import Method
from kvsqueeze.pipeline import generate_encoded, prefill
from kvsqueeze.quantization import QuantSpec
from kvsqueeze.recording import Recording, compress_recording, record

Cell = tuple[str, Method | None, float]  # (label, method or None for 'none', ratio): one of BenchConfig.cells()
COST_FIELDS = ("prefill_seconds", "compression_seconds", "decode_tokens_per_second", "peak_memory_bytes")
WARM_TOKENS = 512  # the prefix a method runs on once before its first cost pass


@dataclass(frozen=True)
class RunLabels:
    """What every row of a run carries that is not computed: the run's id, the model's name, the versions."""

    run: str
    model: str
    versions: dict[str, str]


@dataclass(frozen=True)
class Job:
    """One cell at one quantization on a work unit's context; `cost_pass`: answer with a real, timed run whose
    figures become the cost row of (method, ratio, group)."""

    cell: int  # index into BenchConfig.cells()
    bits: int | None
    cost_pass: bool


@dataclass
class WorkUnit:
    """A context and the jobs still to run on it; `index`: its place in the plan."""

    index: int
    unit: Unit
    jobs: list[Job]


class Event(NamedTuple):
    """What an evaluator hands back: kind "row" (a result row without its cost figures), "cost" (a cost row) or
    "prefill" (a shared prefill was recorded; `row` is empty)."""

    kind: str
    row: Row


def base_row(config: BenchConfig, labels: RunLabels, unit: Unit, qi: int, cell: Cell, bits: int | None) -> Row:
    """The fields of question `qi`'s row that are known before anything runs (enough for its `row_key`)."""
    s, position = unit.sample, unit.question_indices.index(qi)
    return {
        "run": labels.run, "content": unit.contents[position], "task": s.task,
        "context_length": unit.length, "context_tokens": len(unit.context_ids),
        "sample": s.index, "question_index": qi, "method": repr(cell[1]) if cell[1] is not None else NONE,
        "method_name": cell[0], "ratio": cell[2], "query_aware": unit.query_aware, "group": unit.group,
        "question": s.questions[qi], "answers": list(s.answers[qi]), "metric": s.metric,
        "answer_prefix": s.answer_prefix, "model": labels.model, "seed": config.seed, "sample_meta": s.meta,
        **(config.run_fields() if cell[1] is not None else {}), **config.quant_fields(bits),
    }  # fmt: skip


def job_rows(config: BenchConfig, labels: RunLabels, unit: Unit, cells: list[Cell], job: Job) -> list[Row]:
    """The base rows of every question a job answers."""
    return [base_row(config, labels, unit, qi, cells[job.cell], job.bits) for qi in unit.question_indices]


def plan_work(
    config: BenchConfig, labels: RunLabels, units: list[Unit], done: set[tuple], costs: set[tuple]
) -> tuple[list[WorkUnit], int]:
    """(work units, rows already done) for `units`, given the row keys and cost keys a folder already holds. A cell
    whose rows are all done is left out unless its cost pass is missing (then it runs again, for the cost row)."""
    cells, planned = config.cells(), set(costs)
    work: list[WorkUnit] = []
    skipped = 0
    for unit in units:
        jobs = []
        for i, bits in ((i, b) for i in range(len(cells)) for b in config.kv_bits):
            if cell_query_aware(config, cells[i][1]) != unit.query_aware:
                continue  # the cell runs on the units of its own mode
            rows = job_rows(config, labels, unit, cells, Job(i, bits, False))
            todo = sum(row_key(r) not in done for r in rows)
            skipped += len(rows) - todo
            ckey = cost_key(rows[0])
            if todo or ckey not in planned:
                jobs.append(Job(i, bits, ckey not in planned))
                planned.add(ckey)
        if jobs:
            work.append(WorkUnit(len(work), unit, jobs))
    return work, skipped


def replan(config: BenchConfig, labels: RunLabels, work: WorkUnit, done: set[tuple], costs: set[tuple]) -> WorkUnit:
    """`work` less what has been written since it was planned (to run it again after its process died); it keeps
    its cost passes that are still missing."""
    cells, jobs = config.cells(), []
    for job in work.jobs:
        rows = job_rows(config, labels, work.unit, cells, job)
        missing = job.cost_pass and cost_key(rows[0]) not in costs
        if missing or any(row_key(r) not in done for r in rows):
            jobs.append(Job(job.cell, job.bits, missing))
    return WorkUnit(work.index, work.unit, jobs)


class Evaluator:
    """Computes work units with one loaded model (what a serial run's driver and each Ray actor hold)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: BenchConfig,
        labels: RunLabels,
        recordings: RecordingStore | None = None,
    ) -> None:
        self.model, self.tokenizer, self.config, self.labels = model, tokenizer, config, labels
        self.recordings = recordings  # recorded prefills shared with other runs (the tuner's probes), if any
        self.cells = config.cells()
        self.device = next(model.parameters()).device
        self.recording: Recording | None = None
        self.warm = False
        self.warmed_methods: set[str] = set()

    def evaluate(self, work: WorkUnit) -> Iterator[Event]:
        """Run every job of `work`, yielding its events as they happen."""
        self.recording = None
        try:
            for job in work.jobs:
                rows = job_rows(self.config, self.labels, work.unit, self.cells, job)
                yield from self._compute(work.unit, job, rows)
        finally:
            self.recording = None

    def _compute(self, unit: Unit, job: Job, rows: list[Row]) -> Iterator[Event]:
        """Answer the unit's questions compressed with the job's cell, its cache quantized to the job's bits."""
        name, method, _ = self.cells[job.cell]
        method, quant = with_question(method, unit), self.config.quant(job.bits)
        if not self.warm:
            _warm_up(self.model)  # the first forward of a process is slow: keep it out of the first cost pass
            self.warm = True
        torch.manual_seed(self.config.seed)  # methods that draw random numbers give the same rows on a rerun
        try:
            if job.cost_pass:
                self._warm_method(name, method, unit)
                with PeakMemory(self.device) as mem:
                    out = self._generate(unit, method, quant)
                yield Event("cost", self._cost_row(unit, method, quant, rows[0], out.stats, mem.peak_bytes))
                predictions, before, after = list(out.answers), out.stats.kv_bytes_before, out.stats.kv_bytes_after
            elif method is None or (method.shared_prefill and not self.config.forward_time):
                if self.recording is None and self.recordings is not None:
                    self.recording = self.recordings.get(unit.context_ids)
                if self.recording is None:
                    self.recording = _record(self.model, unit.context_ids)
                    yield Event("prefill", {})
                    if self.recordings is not None:
                        self.recordings.put(unit.context_ids, self.recording)
                predictions, before, after = self._from_recording(unit, method, quant)
            else:
                out = self._generate(unit, method, quant)
                predictions, before, after = out.answers, out.stats.kv_bytes_before, out.stats.kv_bytes_after
        except ValueError as err:
            raise ValueError(f"on {unit.sample.task} sample {unit.sample.index} (length {unit.length}): {err}") from err
        for row, prediction in zip(rows, predictions, strict=True):
            yield Event("row", {**row, "prediction": prediction,
                                "score": score(str(prediction), row["answers"], unit.sample.metric),
                                "kv_bytes_before": before, "kv_bytes_after": after})  # fmt: skip

    def _generate(self, unit: Unit, method: Method | None, quant: QuantSpec | None) -> Any:
        """A real run (prefill, compress, answer); `quant`: the cache is quantized as it fills (`pipeline.prefill`)."""
        texts, rows = unit.question_texts, [0] * len(unit.question_texts)
        new, c = unit.max_new_tokens, self.config
        if method is None:  # the uncompressed baseline runs one-shot
            return generate_encoded(self.model, self.tokenizer, [unit.context_ids], texts, rows, None, new,
                                    quant=quant)  # fmt: skip
        return generate_encoded(self.model, self.tokenizer, [unit.context_ids], texts, rows, method, new,
                                c.chunk_size, c.decode_target, c.decode_every, quant=quant)  # fmt: skip

    def _warm_method(self, name: str, method: Method | None, unit: Unit) -> None:
        """Run a method once on a short prefix before its first cost pass, so one-off work (loading calibration
        statistics, first-call overheads) is not counted as its compression time. Best effort: errors are ignored."""
        if method is None or name in self.warmed_methods:
            return
        self.warmed_methods.add(name)
        ids = torch.tensor([unit.context_ids[:WARM_TOKENS]], device=self.device)
        with contextlib.suppress(ValueError):  # e.g. a prefix shorter than a protected window: the real run will say
            prefill(self.model, ids, torch.ones_like(ids), method)

    def _cost_row(self, unit: Unit, method: Method | None, quant: QuantSpec | None, row: Row, s: Any, peak: int) -> Row:
        return {
            "run": self.labels.run, "method": row["method"], "ratio": row["ratio"], "group": unit.group,
            "model": self.labels.model, "seed": self.config.seed, "query_aware": unit.query_aware,
            **(self.config.run_fields() if method is not None else {}),
            **self.config.quant_fields(None if quant is None else quant.bits),
            "sample": f"{unit.sample.task}#{unit.sample.index}", "context_tokens": len(unit.context_ids),
            "prefill_seconds": s.prefill_seconds, "compression_seconds": s.compression_seconds,
            "decode_tokens_per_second": s.decode_tokens_per_second, "peak_memory_bytes": peak,
            "kv_bytes_before": s.kv_bytes_before, "kv_bytes_after": s.kv_bytes_after, "device": str(self.device),
        }  # fmt: skip

    def _from_recording(self, unit: Unit, method: Method | None, quant: QuantSpec | None) -> tuple[list[str], int, int]:
        """Answer from a compressed copy of the unit's full-precision recording, quantized after compression (the
        methods scored full-precision keys, as in a real run). Bytes before: the uncompressed full-precision cache."""
        assert self.recording is not None  # taken by _compute
        cache, log = compress_recording(self.recording, method)
        before = log.kv_bytes_before if log.bytes_before else cache_stats(cache).kv_bytes
        if quant is not None:
            cache.quantize(quant.bits, quant.group_size, quant.residual)
        after = cache_stats(cache).kv_bytes
        rows = [0] * len(unit.question_texts)
        texts = answer(self.model, self.tokenizer, cache, rows, unit.question_texts, unit.max_new_tokens).texts
        return texts, before, after


@torch.no_grad()
def _warm_up(model: Any) -> None:
    ids = torch.ones(1, 16, dtype=torch.long, device=next(model.parameters()).device)
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


@torch.no_grad()
def _record(model: Any, context_ids: list[int]) -> Recording:
    """The uncompressed one-shot prefill of one context, with every full-attention layer's inputs."""
    ids = torch.tensor([context_ids], device=next(model.parameters()).device)
    cache = KVCache(model.config)
    with record(model, cache) as rec:
        mask = torch.ones_like(ids)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return rec
