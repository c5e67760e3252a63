"""The driver's row writer: rows wait for their cost row, are written once, and a unit given up becomes failed rows."""

from __future__ import annotations

from pathlib import Path

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.results import COSTS, FAILED, RESULTS, read_jsonl, row_key
from kvsqueeze.bench.units import plan_units
from kvsqueeze.bench.work import COST_FIELDS, Event, RunLabels, job_rows, plan_work
from kvsqueeze.bench.writer import BenchRun, RowWriter

LABELS = RunLabels("run0", "tiny", {"kvsqueeze": "0"})


class Count:
    """A progress bar that counts its steps."""

    n = 0

    def update(self, n: int) -> None:
        self.n += n


def _setup(fakes, llama, tmp_path: Path) -> tuple[BenchConfig, list, RowWriter, Count]:
    model, tok = llama
    config = BenchConfig(methods=("knorm",), ratios=(0.5,), tasks=("fake",), lengths=(40,), samples=2)
    work, _ = plan_work(config, LABELS, plan_units(model, tok, config), set(), set())
    bar = Count()
    return config, work, RowWriter(BenchRun(tmp_path), config, LABELS, set(), {}, bar), bar


def _answered(row: dict) -> dict:
    return {**row, "prediction": "4127", "score": 1.0, "kv_bytes_before": 10, "kv_bytes_after": 5}


def _cost(row: dict) -> dict:
    keys = ("run", "method", "ratio", "group", "model", "seed", "query_aware", "kv_bits")
    return {**{k: row[k] for k in keys}, "sample": "fake#0", **dict.fromkeys(COST_FIELDS, 1.0)}


def test_rows_wait_for_their_cost_row_and_are_written_once(fakes, llama, tmp_path: Path) -> None:
    config, work, writer, bar = _setup(fakes, llama, tmp_path)
    late = [_answered(r) for r in job_rows(config, LABELS, work[1].unit, config.cells(), work[1].jobs[0])]
    for row in late:  # the second context finished before the first one's cost pass
        writer.take(Event("row", row))
    assert not (tmp_path / RESULTS).read_text() and bar.n == 0
    writer.take(Event("cost", _cost(late[0])))
    writer.take(Event("cost", _cost(late[0])))  # a unit run again: its cost row is not written twice
    for row in late:
        writer.take(Event("row", row))  # nor are its rows
    writer.close()
    rows = read_jsonl(tmp_path / RESULTS)
    assert [row_key(r) for r in rows] == [row_key(r) for r in late] and bar.n == len(late) == writer.run.computed_rows
    assert all(r["prefill_seconds"] == 1.0 and r["cost_sample"] == "fake#0" and r["versions"] == LABELS.versions
               for r in rows)  # fmt: skip
    assert len(read_jsonl(tmp_path / COSTS)) == 1 == writer.run.cost_passes


def test_a_unit_given_up_fails_its_rows_and_those_waiting_for_its_cost_pass(fakes, llama, tmp_path: Path) -> None:
    (tmp_path / FAILED).write_text('{"an old failure": 1}\n')
    config, work, writer, bar = _setup(fakes, llama, tmp_path)
    assert not (tmp_path / FAILED).exists()  # a run starts by emptying failed.jsonl: it computes those rows again
    waiting = [_answered(r) for r in job_rows(config, LABELS, work[1].unit, config.cells(), work[1].jobs[0])]
    for row in waiting:
        writer.take(Event("row", row))
    writer.give_up(work[0], "ActorDiedError: killed")  # the unit that owned the cost pass
    writer.take(Event("row", waiting[0]))  # a late copy is not written again
    writer.close()
    failed = read_jsonl(tmp_path / FAILED)
    assert len(failed) == 2 * 2 == writer.run.failed_rows == bar.n and not read_jsonl(tmp_path / RESULTS)
    assert sorted(f["error"] for f in failed)[0] == "ActorDiedError: killed"
    assert sum("its cost pass (fake sample 0) failed" in f["error"] for f in failed) == 2
