"""The running batch, in the scheduler's thread: the jobs being answered as rows of one `BatchDecoder`. A job joins
between two steps once its context is found (or prefilled); each step advances every row by one token and posts the
text it added; a job leaves when it finishes or when its client has gone (`cancelled`), at the next step.

Rows over different contexts and compression settings sit side by side. Two things keep rows apart: a method that
compresses while decoding (H2O, DMS, `decoding`) runs over the whole batch, so jobs join only a batch decoded with
the same one (by repr; the other methods have none and mix freely), and caches whose rows cannot share a batch
(`KVCache.concat_problem`: ThinK's thin keys beside full ones). A job that cannot join waits until the batch empties.
"""

from __future__ import annotations

import time

from kvsqueeze.batching import BatchDecoder
from kvsqueeze.generation import Delta
from kvsqueeze.pipeline import decoding_method
from kvsqueeze.serve.engine import Engine
from kvsqueeze.serve.jobs import Finished, Job, Started, Text
from kvsqueeze.serve.metrics import Metrics


class RunningBatch:
    """At most `max_rows` jobs decoded together (the server's --max-batch)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_rows: int) -> None:
        self.engine, self.metrics, self.max_rows = engine, metrics, max_rows
        self.decoder = BatchDecoder(engine.model, engine.tokenizer)
        self.decode_key = repr(None)  # the decoding-time method the rows share
        self.jobs: dict[int, Job] = {}  # row id -> the job it answers

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def full(self) -> bool:
        return len(self.jobs) >= self.max_rows

    def admit(self, job: Job) -> bool:
        """Find (or prefill) the job's context and add its row to the batch; False when its rows cannot sit beside
        the running ones (the job keeps its context and waits for the batch to empty)."""
        decode = decoding_method(job.method, None)
        if self.jobs and repr(decode) != self.decode_key:
            return False
        if job.context is None:
            job.context, job.found = self.engine.context(job)
        if not self.jobs:  # an empty batch takes the job's decoding-time method
            self.decoder = BatchDecoder(self.engine.model, self.engine.tokenizer, decode)
            self.decode_key = repr(decode)
        elif self.decoder.problem(job.context.cache) is not None:
            return False
        row = self.decoder.add(job.context.cache, job.question or "", job.sampling)
        self.jobs[row] = job
        job.post(Started(job.prompt_tokens, job.context.id, job.found or "miss"))
        job.context = None  # the row holds its fork (which keeps the context's storages alive while it runs)
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        return True

    def drop_cancelled(self) -> None:
        """Rows whose client left leave the batch (before the next step's forward)."""
        for row, job in list(self.jobs.items()):
            if job.cancelled.is_set():
                self.decoder.remove(row)
                del self.jobs[row]
                self.metrics.cancelled.inc()

    def step(self) -> None:
        """One decode step of every row; their text and finish reasons posted to their jobs."""
        rows = len(self.decoder)
        if rows == 0:
            return
        start = time.perf_counter()
        deltas = self.decoder.step()
        now = time.perf_counter()
        self.metrics.batch_rows.observe(rows)
        self.metrics.generated_tokens.inc(rows)  # every row took one token
        self.metrics.decode_seconds.inc(now - start)
        for delta in deltas:
            self.post(delta, now)

    def post(self, delta: Delta, now: float) -> None:
        job = self.jobs[delta.row]
        if delta.text:
            if job.first_text is None:
                job.first_text = now
                self.metrics.time_to_first_token.observe(now - job.created)
            job.post(Text(delta.text))
        if delta.finish_reason is not None:
            job.post(Finished(delta.finish_reason, delta.steps))
            del self.jobs[delta.row]

    def clear(self) -> list[Job]:
        """Forget every row (a step failed, or the server stops); returns their jobs, to be answered."""
        jobs = list(self.jobs.values())
        self.jobs = {}
        self.decoder = BatchDecoder(self.engine.model, self.engine.tokenizer)
        self.decode_key = repr(None)
        return jobs
