"""The scheduler: one worker thread that alone runs the model, fed by a bounded queue of jobs.

The event loop only submits jobs and awaits their events, so it never waits on the model. The worker loops in rounds,
one decode step each (continuous batching):
1. prepare every job that arrived (split and tokenize its prompt, name its context);
2. run the context jobs (`POST /v1/contexts`: a prefill, no row);
3. admit waiting jobs into the running batch, oldest first, while it has fewer than `max_batch` rows: each finds its
   context (a prefill on a miss) and joins beside the running rows, whatever their contexts and compression; a job
   that cannot sit beside them (`serve/batch.py`) waits, and so does everyone behind it, until the batch empties;
4. drop the rows whose clients left, and run one decode step of every running row.
A prefill (steps 2 and 3) pauses the running rows for its duration: the model does one thing at a time.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from kvsqueeze.serve.batch import RunningBatch
from kvsqueeze.serve.engine import Engine
from kvsqueeze.serve.errors import APIError, bad_request, internal_error
from kvsqueeze.serve.jobs import Failed, Job
from kvsqueeze.serve.metrics import Metrics

logger = logging.getLogger("kvsqueeze")


def overloaded(waiting: int) -> APIError:
    return APIError(503, f"the server is busy: {waiting} requests are waiting for the model; retry later",
                    None, "server_overloaded")  # fmt: skip


class Scheduler:
    """Runs jobs on `engine` in its own thread; at most `max_queue` jobs wait (more are refused with a 503) and at
    most `max_batch` are decoded together."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int, max_batch: int) -> None:
        self.engine, self.metrics, self.max_queue, self.max_batch = engine, metrics, max_queue, max_batch
        self._incoming: deque[Job] = deque()  # submitted, not yet prepared
        self._ready: list[Job] = []  # prepared, waiting to join the batch (touched by the worker only)
        self._backlog = 0  # jobs submitted that have not joined the batch (or run, for a context job) yet
        self._cond = threading.Condition()
        self._stopping = False
        self._batch = RunningBatch(engine, metrics, max_batch)  # touched by the worker only
        self._running: list[Job] = []  # the batch's jobs after the last round (read by `stop`)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="kvsqueeze-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker: waiting and running jobs are answered with a 503 once the current step ends."""
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
                left = [*self._batch.clear(), *self._ready, *self._incoming]
                self._ready, self._incoming = [], deque()
            self._running = []
            self.metrics.running.set(0)
            self._refuse(left)

    def _round(self) -> bool:
        """Prepare what arrived, run context jobs, admit jobs into the batch, then one decode step; False once the
        scheduler is stopping."""
        with self._cond:
            while not self._incoming and not self._ready and not len(self._batch) and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            arrived = list(self._incoming)
            self._incoming.clear()
        self._ready += [job for job in arrived if self._prepare(job)]
        self._started([job for job in self._ready if job.cancelled.is_set()])
        self._ready = [job for job in self._ready if not job.cancelled.is_set()]
        self._run_contexts()
        self._admit()
        self._batch.drop_cancelled()
        try:
            self._batch.step()
        except Exception as err:  # the running jobs are answered with the error; the worker lives on
            self._fail(self._batch.clear(), err)
        self._running = list(self._batch.jobs.values())
        self.metrics.running.set(len(self._running))
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

    def _run_contexts(self) -> None:
        """Context jobs take no row: they run as soon as they are prepared."""
        for job in [job for job in self._ready if job.kind == "context"]:
            self._ready.remove(job)
            self._started([job])
            try:
                self.engine.run_context(job)
            except Exception as err:
                self._fail([job], err)

    def _admit(self) -> None:
        """Waiting jobs join the batch, oldest first, while it has room and they can sit beside its rows."""
        while self._ready and not self._batch.full:
            job = self._ready[0]
            try:
                if not self._batch.admit(job):
                    return  # it waits for the batch to empty, and the jobs behind it with it
            except Exception as err:  # its context could not be made: answered, and it leaves the queue
                self._fail([job], err)
            self._ready.pop(0)
            self._started([job])

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
