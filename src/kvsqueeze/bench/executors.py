"""Executors: who computes a run's work units. Each hands every event to the driver's `RowWriter` as it comes, so the
rows land in the same files whichever executor ran; the executor is not part of the run identity (a serial rerun
resumes a Ray run's folder and the other way round).

- `SerialExecutor`: one after another, in this process, with the model the caller loaded.
- `ray_executor.RayExecutor`: Ray actors, each loading the model once, locally or on a cluster.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from kvsqueeze.bench.work import Evaluator, WorkUnit
from kvsqueeze.bench.writer import RowWriter

logger = logging.getLogger("kvsqueeze")

EXECUTORS = ("serial", "ray")


class Executor(Protocol):
    def run(self, work: list[WorkUnit], writer: RowWriter) -> None:
        """Compute every work unit, handing each event to `writer` as it comes."""
        ...


class SerialExecutor:
    """Computes the work units in order, in this process."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def run(self, work: list[WorkUnit], writer: RowWriter) -> None:
        for unit in work:
            start = time.perf_counter()
            for event in self.evaluator.evaluate(unit):
                writer.take(event)
            logger.debug("work unit %d (%s, %d tokens, %d jobs) took %.3f s", unit.index, unit.unit.group,
                         len(unit.unit.context_ids), len(unit.jobs), time.perf_counter() - start)  # fmt: skip
