"""The scheduler: one worker thread that alone runs the model, fed by a bounded queue of jobs.

The event loop only submits jobs and awaits their events, so it never waits on the model. The worker prepares every
job that arrived (tokenizes it and names its context), then runs the oldest job with the jobs waiting over the same
context (up to `max_batch`) as rows of one batched decode: one forward per step for all of them. Jobs that arrive
meanwhile wait for the next batch.

Continuous batching (rows joining and leaving a running batch between steps, rows over different contexts side by
side) needs a decode step that can run outside a generator and caches of different contexts merged into one; the
queue, the preparation and the per-step cancellation here stay as they are when it comes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from kvsqueeze.serve.engine import Engine
from kvsqueeze.serve.errors import APIError, bad_request, internal_error
from kvsqueeze.serve.jobs import Failed, Job
from kvsqueeze.serve.metrics import Metrics

logger = logging.getLogger("kvsqueeze")


def overloaded(waiting: int) -> APIError:
    return APIError(503, f"the server is busy: {waiting} requests are waiting for the model; retry later",
                    None, "server_overloaded")  # fmt: skip


class Scheduler:
    """Runs jobs on `engine` in its own thread; at most `max_queue` jobs wait (more are refused with a 503)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int, max_batch: int) -> None:
        self.engine, self.metrics, self.max_queue, self.max_batch = engine, metrics, max_queue, max_batch
        self._incoming: deque[Job] = deque()  # submitted, not yet prepared
        self._ready: list[Job] = []  # prepared, waiting for their batch (touched by the worker only)
        self._backlog = 0  # jobs submitted whose batch has not started yet
        self._cond = threading.Condition()
        self._stopping = False
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="kvsqueeze-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker: waiting jobs are answered with a 503, a running batch is cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for job in list(self._running):
            job.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 503 APIError when `max_queue` jobs are already waiting."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down (or its model worker stopped: see its log)", None,
                               "server_shutting_down")  # fmt: skip
            if self._backlog >= self.max_queue:
                raise overloaded(self._backlog)
            self._incoming.append(job)
            self._backlog += 1
            self.metrics.queued.set(self._backlog)
            self._cond.notify()

    def _started(self, jobs: list[Job]) -> None:
        with self._cond:
            self._backlog -= len(jobs)
            self.metrics.queued.set(self._backlog)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before start, after stop, or if it died of a bug)."""
        return self._thread is not None and self._thread.is_alive()

    def _work(self) -> None:
        try:
            while self._round():
                pass
        except Exception:  # a bug in the scheduler itself: say so, answer everyone, refuse what comes next
            logger.exception("the model's worker thread stopped")
        finally:
            with self._cond:
                self._stopping = True
                left = [*self._ready, *self._incoming]
                self._ready, self._incoming = [], deque()
            self._refuse(left)

    def _round(self) -> bool:
        """Prepare what arrived, then run the oldest batch; False once the scheduler is stopping."""
        with self._cond:
            while not self._incoming and not self._ready and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            arrived = list(self._incoming)
            self._incoming.clear()
        self._ready += [job for job in arrived if self._prepare(job)]
        self._started([job for job in self._ready if job.cancelled.is_set()])
        self._ready = [job for job in self._ready if not job.cancelled.is_set()]
        if self._ready:
            batch = self._take(self._ready)
            self._ready = [job for job in self._ready if job not in batch]
            self._run(batch)
        return True

    def _prepare(self, job: Job) -> bool:
        """Prepare a job; False (and the job answered with its error) when it cannot run."""
        try:
            self.engine.prepare(job)
            return True
        except Exception as err:  # every failure is answered; the worker lives on
            self._started([job])
            self._fail([job], err)
            return False

    def _take(self, ready: list[Job]) -> list[Job]:
        """The oldest job and the generation jobs waiting over the same context, up to `max_batch`."""
        head = ready[0]
        if head.kind == "context":
            return [head]
        same = [job for job in ready if job.kind == "generate" and job.context_id == head.context_id]
        return same[: self.max_batch]

    def _run(self, batch: list[Job]) -> None:
        self._started(batch)
        self._running = batch
        self.metrics.running.set(len(batch))
        try:
            if batch[0].kind == "context":
                self.engine.run_context(batch[0])
            else:
                self.engine.run_batch(batch)
        except Exception as err:  # the batch is answered with the error; the worker lives on
            self._fail(batch, err)
        finally:
            self._running = []
            self.metrics.running.set(0)

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        if isinstance(err, APIError):
            error = err
        elif isinstance(err, ValueError):
            error = bad_request(err)
        else:
            logger.exception("a request failed on the server's side")
            error = internal_error()
        for job in jobs:
            job.post(Failed(error))

    def _refuse(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.cancel()
            job.post(Failed(APIError(503, "the server is shutting down", None, "server_shutting_down")))
