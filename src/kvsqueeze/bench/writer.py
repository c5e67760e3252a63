"""The driver's side of a run: the one place rows are written, whichever executor computed them.

`RowWriter` takes the evaluators' events as they arrive: a cost row is appended to costs.jsonl; a result row gets its
cost pass's figures and the versions and is appended to results.jsonl, unless a row of the same key is there already
(a unit computed again after its worker died) or its cost row has not come yet (another worker is computing it: the
row waits, and is written when it comes). Rows a run gives up on go to failed.jsonl with the error, which a rerun
empties and computes again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.results import COSTS, FAILED, RESULTS, Appender, Row, cost_key, row_key
from kvsqueeze.bench.work import COST_FIELDS, Event, RunLabels, WorkUnit, job_rows

logger = logging.getLogger("kvsqueeze")


@dataclass
class BenchRun:
    """What a `run_bench` call did."""

    out_dir: Path
    computed_rows: int = 0
    skipped_rows: int = 0
    prefills: int = 0  # shared (recorded) prefills
    cost_passes: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    run_id: str = ""  # folder.identity_id of the run identity: the `run` field of every row
    superseded_rows: int = 0  # rows of edited dataset questions moved to superseded.jsonl
    failed_rows: int = 0  # rows written to failed.jsonl (their unit's worker died more often than allowed)
    retried_units: int = 0  # units run again after their worker died


class RowWriter:
    """Writes the rows of a run into its folder as they arrive (see the module docstring); `progress` is a tqdm bar
    (or anything with `update(n)`) fed one step per row written or failed."""

    def __init__(
        self,
        run: BenchRun,
        config: BenchConfig,
        labels: RunLabels,
        done: set[tuple],
        costs: dict[tuple, Row],
        progress: Any,
    ) -> None:
        self.run, self.config, self.labels, self.progress = run, config, labels, progress
        self.done, self.costs = done, costs
        self.cells = config.cells()
        self.waiting: dict[tuple, list[Row]] = {}  # cost key -> rows waiting for that cost row
        self.lost_costs: dict[tuple, str] = {}  # cost key -> why its cost pass will not come
        (run.out_dir / FAILED).unlink(missing_ok=True)  # the last run's failures: computed again now
        self.results, self.cost_file = Appender(run.out_dir / RESULTS), Appender(run.out_dir / COSTS)
        self.failed: Appender | None = None

    def take(self, event: Event) -> None:
        """One event of an evaluator."""
        if event.kind == "prefill":
            self.run.prefills += 1
        elif event.kind == "cost":
            self._cost(event.row)
        else:
            self._row(event.row)

    def _cost(self, cost: Row) -> None:
        key = cost_key(cost)
        if key in self.costs:
            return  # a unit computed again after its worker died: its first cost row stands
        self.cost_file.write(cost)
        self.costs[key] = cost
        self.run.cost_passes += 1
        for row in self.waiting.pop(key, []):
            self._row(row)

    def _row(self, row: Row) -> None:
        key, ckey = row_key(row), cost_key(row)
        if key in self.done:
            return
        if ckey in self.lost_costs:
            self._fail(row, self.lost_costs[ckey])
        elif ckey not in self.costs:
            self.waiting.setdefault(ckey, []).append(row)
        else:
            cost = self.costs[ckey]
            self.results.write({**row, **{k: cost[k] for k in COST_FIELDS}, "cost_sample": cost["sample"],
                                "versions": self.labels.versions})  # fmt: skip
            self.done.add(key)
            self.run.computed_rows += 1
            self.progress.update(1)

    def give_up(self, work: WorkUnit, error: str) -> None:
        """Write the rows of `work` not written yet as failed rows naming `error`; so are rows of other units
        waiting for a cost pass `work` owned."""
        for job in work.jobs:
            rows = job_rows(self.config, self.labels, work.unit, self.cells, job)
            ckey = cost_key(rows[0])
            if job.cost_pass and ckey not in self.costs:
                why = f"its cost pass ({work.unit.sample.task} sample {work.unit.sample.index}) failed: {error}"
                self.lost_costs[ckey] = why
                for row in self.waiting.pop(ckey, []):
                    self._fail(row, why)
            for row in rows:
                if row_key(row) not in self.done:
                    self._fail(row, error)

    def _fail(self, row: Row, error: str) -> None:
        if self.failed is None:
            self.failed = Appender(self.run.out_dir / FAILED)
        self.failed.write({**row, "error": error})
        self.done.add(row_key(row))  # written once: a late copy of the row is not written again
        self.run.failed_rows += 1
        self.progress.update(1)

    def close(self) -> None:
        """Close the files. Rows still waiting for a cost row (an interrupted run) are not written: a rerun computes
        them."""
        left = sum(len(rows) for rows in self.waiting.values())
        if left:
            logger.warning("%d finished row(s) waited for a cost pass that did not finish; a rerun computes them", left)
        for file in (self.results, self.cost_file, self.failed):
            if file is not None:
                file.close()
