"""Planning work units: which cells each context runs, which unit owns each cost pass, what a resume leaves out."""

from __future__ import annotations

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.results import cost_key, row_key
from kvsqueeze.bench.units import plan_units
from kvsqueeze.bench.work import Job, RunLabels, job_rows, plan_work, replan

LABELS = RunLabels("run0", "tiny", {"kvsqueeze": "0"})


def _config() -> BenchConfig:
    return BenchConfig(methods=("none", "knorm"), ratios=(0.25, 0.5), tasks=("fake",), lengths=(40, 48), samples=2)


def test_every_context_runs_every_cell_and_the_first_of_each_length_owns_its_cost_passes(fakes, llama) -> None:
    model, tok = llama
    config = _config()
    units = plan_units(model, tok, config)
    work, skipped = plan_work(config, LABELS, units, set(), set())
    assert skipped == 0 and [w.index for w in work] == [0, 1, 2, 3]
    assert all([(j.cell, j.bits) for j in w.jobs] == [(0, None), (1, None), (2, None)] for w in work)
    owners = [w.unit.length for w in work if all(j.cost_pass for j in w.jobs)]
    assert owners == [40, 48] and not any(j.cost_pass for w in work[1::2] for j in w.jobs)


def test_a_resume_plans_only_what_is_missing(fakes, llama) -> None:
    model, tok = llama
    config = _config()
    units = plan_units(model, tok, config)
    first, _ = plan_work(config, LABELS, units, set(), set())
    cells = config.cells()
    rows = [r for w in first for j in w.jobs for r in job_rows(config, LABELS, w.unit, cells, j)]
    done, costs = {row_key(r) for r in rows}, {cost_key(r) for r in rows}
    assert plan_work(config, LABELS, units, done, costs) == ([], len(rows))
    # the rows of one cell on the second context were lost: only that job runs, answering from the recording
    lost = job_rows(config, LABELS, first[1].unit, cells, first[1].jobs[2])
    work, skipped = plan_work(config, LABELS, units, done - {row_key(r) for r in lost}, costs)
    assert [(w.unit.length, w.jobs) for w in work] == [(40, [Job(2, None, False)])] and skipped == len(rows) - 2
    # a cost row lost with its rows kept: the first context of that length runs the cell again, for its cost
    gone = cost_key(lost[0])
    work, _ = plan_work(config, LABELS, units, done, costs - {gone})
    assert [(w.index, w.jobs) for w in work] == [(0, [Job(2, None, True)])]


def test_replan_drops_what_was_written_and_keeps_a_missing_cost_pass(fakes, llama) -> None:
    model, tok = llama
    config = _config()
    unit = plan_work(config, LABELS, plan_units(model, tok, config), set(), set())[0][0]
    cells = config.cells()
    rows = {j.cell: job_rows(config, LABELS, unit.unit, cells, j) for j in unit.jobs}
    done = {row_key(r) for r in rows[0] + rows[1]}
    again = replan(config, LABELS, unit, done, {cost_key(rows[0][0])})
    assert again.index == unit.index and again.jobs == [Job(1, None, True), Job(2, None, True)]
