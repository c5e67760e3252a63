"""The Ray executor: work units computed by Ray actors, on this machine or on a cluster.

Each actor loads the model once, by name (`loading.ModelSpec`: a model object is never shipped), and computes one
work unit at a time, streaming its events back (a Ray generator) so that rows are written as they come. GPU runs
(the driver's model on CUDA) give each actor one GPU (`num_gpus=1`); CPU actors claim `threads` CPUs each and run
torch on that many threads, so actors do not oversubscribe the cores. Before any work of a run, every actor's run
identity (versions, model fingerprint, dtype, device type ...) must equal the driver's: a cluster node with another
model file or another transformers refuses to start rather than writing rows of another run under this run's id.

The actors live in a `RayPool`, which outlives one run when its owner wants it to: the tuner runs many small
benchmarks (one probe each) on one pool, whose actors keep the prefills they recorded (`recording_bytes`), and each
context goes back to the actor that recorded it when that actor is free, so a context is prefilled about once per
tune rather than once per probe.

Faults: a unit whose actor dies (killed, out of memory, node lost) runs again, less what was written, on a fresh
actor, up to `retries` times; then its missing rows go to failed.jsonl naming the error. An exception raised by the
work itself (a bad method option, say) stops the run as it would stop a serial one. Ctrl-C kills the actors; the
rows written stay, and the rerun (serial or Ray) computes the rest.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.folder import identity_diff, run_identity
from kvsqueeze.bench.recordings import RecordingStore, ids_key
from kvsqueeze.bench.work import Evaluator, Event, RunLabels, WorkUnit, replan
from kvsqueeze.bench.writer import RowWriter
from kvsqueeze.loading import ModelSpec
from kvsqueeze.validation import check_int

logger = logging.getLogger("kvsqueeze")

INSTALL = "the Ray executor needs Ray: pip install 'kvsqueeze[ray]'"
ACTOR_PREFIX = "kvsqueeze-bench"  # actors are named ACTOR_PREFIX-<first run id>-<driver pid>-<n> (`ray list actors`)
WAIT_SECONDS = 0.5  # the driver wakes at least this often (so Ctrl-C is seen at once)


def import_ray() -> Any:
    """The `ray` module; ModuleNotFoundError saying how to install it when it is missing."""
    try:
        return importlib.import_module("ray")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(INSTALL) from None


@dataclass(frozen=True)
class RayOptions:
    """How a run uses Ray. `address`: a running cluster to join (None: start Ray on this machine, or use the one this
    process already started); `actors`: how many (None: one per GPU on a GPU run, else 2); `threads`: torch threads
    (and Ray CPUs) per CPU actor (None: the smallest node's CPUs // actors, at least 1); `retries`: how many times a
    unit whose actor died runs again before its rows are written as failed."""

    address: str | None = None
    actors: int | None = None
    threads: int | None = None
    retries: int = 2

    def __post_init__(self) -> None:
        check_int("actors", self.actors, 1, none_ok=True)
        check_int("threads", self.threads, 1, none_ok=True)
        check_int("retries", self.retries, 0)


class BenchActor:
    """What runs inside one Ray actor: the model, loaded once, an evaluator per run, and (when `recording_bytes`) the
    prefills it recorded, kept for later runs."""

    def __init__(self, spec: ModelSpec, threads: int | None, recording_bytes: int = 0) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.model, self.tokenizer = spec.load()
        self.recordings = RecordingStore(recording_bytes) if recording_bytes else None
        self.evaluators: dict[str, Evaluator] = {}
        self.warmed_methods: set[str] = set()  # shared by this actor's evaluators: a method warms up once

    def identity(self, config: BenchConfig, model_name: str) -> dict[str, Any]:
        """The run identity this actor's model gives `config` (it must equal the driver's)."""
        return run_identity(self.model, self.tokenizer, config, model_name)

    def pid(self) -> int:
        """The actor's process id (call it with `.options(concurrency_group="control")` to run it beside a unit in
        progress)."""
        return os.getpid()

    def evaluate(self, config: BenchConfig, labels: RunLabels, work: WorkUnit) -> Iterator[Event]:
        key = json.dumps([dataclasses.asdict(config), labels.run], sort_keys=True, default=str)
        evaluator = self.evaluators.get(key)
        if evaluator is None:
            evaluator = Evaluator(self.model, self.tokenizer, config, labels, self.recordings)
            evaluator.warm = bool(self.evaluators)  # the process's first forward ran in an earlier evaluator
            evaluator.warmed_methods = self.warmed_methods
            self.evaluators[key] = evaluator
        yield from evaluator.evaluate(work)


@dataclass
class Worker:
    """One actor of a pool, with the name it was started under."""

    name: str
    handle: Any


class RayPool:
    """Ray actors that load the model by `spec` and compute work units, kept until the pool closes (use it as a
    context manager). Ray starts on the first run with work (joining `options.address` when given) and, if the pool
    started it, shuts down when the pool closes. `recording_bytes`: what each actor may keep of recorded prefills
    for later runs (0: nothing, each unit records its own, as a one-off run wants)."""

    def __init__(self, spec: ModelSpec, options: RayOptions | None = None, recording_bytes: int = 0) -> None:
        self.ray = import_ray()
        self.died = died_errors(self.ray)
        self.spec, self.options = spec, options or RayOptions()
        check_int("recording_bytes", recording_bytes, 0)
        self.recording_bytes = recording_bytes
        self.gpu = spec.device is not None and spec.device.startswith("cuda")
        self.own = False  # whether this pool started Ray (and shuts it down)
        self.actor_class: Any = None
        self.count = 0  # how many actors the pool keeps
        self.resources: dict[str, int] = {}  # what each actor asks Ray for
        self.threads: int | None = None  # torch threads of each CPU actor
        self.started = 0  # actors started so far (names them)
        self.workers: list[Worker] = []  # alive actors
        self.recorded: dict[str, str] = {}  # context key -> the worker that last prefilled it (with recording_bytes)
        self.prefix = ""

    def __enter__(self) -> RayPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors; shut Ray down if this pool started it."""
        for worker in self.workers:
            self.ray.kill(worker.handle)
        self.workers, self.recorded = [], {}
        if self.own:
            self.ray.shutdown()
            self.own = False
        self.actor_class = None

    def run(
        self, config: BenchConfig, labels: RunLabels, identity: dict, work: list[WorkUnit], writer: RowWriter
    ) -> None:
        """Compute `work` (units of the run `labels`/`identity` with `config`), handing each event to `writer`."""
        if not work:
            return
        self._open(labels)
        try:
            self._check(config, labels, identity, self.workers)
            self._schedule(config, labels, identity, work, writer)
        except Exception:
            raise  # an error of the work: the pool stays usable (`_schedule` stopped what was running)
        except BaseException:
            self.close()  # Ctrl-C: the actors stop now
            raise

    def _open(self, labels: RunLabels) -> None:
        if self.actor_class is not None:
            return
        if not self.ray.is_initialized():
            self.own = True
            if self.options.address:
                self.ray.init(address=self.options.address)  # a running cluster, as it was started
            else:
                self.ray.init(address="local", include_dashboard=False)  # a new Ray on this machine, for this pool
        self.count, threads = self._sizes()
        logger.info("Ray: %d actor(s), %s each", self.count, "1 GPU" if self.gpu else f"{threads} CPU thread(s)")
        self.actor_class = self.ray.remote(concurrency_groups={"control": 1})(BenchActor)
        self.resources = {"num_gpus": 1} if self.gpu else {"num_cpus": threads}
        self.threads = None if self.gpu else threads
        self.prefix = f"{ACTOR_PREFIX}-{labels.run}-{os.getpid()}"

    def _schedule(
        self, config: BenchConfig, labels: RunLabels, identity: dict, work: list[WorkUnit], writer: RowWriter
    ) -> None:
        idle = list(self.workers)
        if len(self.workers) < self.count:
            idle += self._start(config, labels, identity, min(self.count - len(self.workers), len(work)))
        queue, tries = deque(work), dict.fromkeys((w.index for w in work), 0)
        running: dict[Any, tuple[Worker, WorkUnit]] = {}  # a unit's event stream -> (its actor, the unit)
        try:
            while queue or running:
                while idle and queue:
                    worker = idle.pop()
                    unit = self._pick(queue, worker)
                    running[worker.handle.evaluate.remote(config, labels, unit)] = (worker, unit)
                ready, _ = self.ray.wait(list(running), num_returns=1, timeout=WAIT_SECONDS)
                for stream in ready:
                    worker, unit = running[stream]
                    try:
                        event = self.ray.get(next(stream))
                    except StopIteration:
                        del running[stream]
                        idle.append(worker)
                    except self.died as err:
                        del running[stream]
                        self._dead(worker)
                        idle += self._start(config, labels, identity)
                        tries[unit.index] += 1
                        again = replan(config, labels, unit, writer.done, set(writer.costs))
                        if tries[unit.index] <= self.options.retries:
                            logger.warning("Ray: an actor died (%s); its unit runs again", _first_line(err))
                            writer.run.retried_units += 1
                            queue.appendleft(again)
                        else:
                            writer.give_up(again, f"{type(err).__name__}: {_first_line(err)} (tried {tries[unit.index]}"
                                                  " times)")  # fmt: skip
                    except Exception as err:
                        del running[stream]  # the work failed in this actor; the actor itself is fine
                        cause = getattr(err, "cause", None)  # the actor's own exception, without Ray's wrapping
                        if isinstance(cause, Exception):
                            raise cause from None
                        raise
                    else:
                        writer.take(event)
        except Exception:
            for worker, _ in running.values():  # the units of a run that stops: their actors go, fresh ones come later
                self._dead(worker)
            raise

    def _pick(self, queue: deque[WorkUnit], worker: Worker) -> WorkUnit:
        """The next unit for `worker`: one whose context it recorded, else one no actor recorded, else the first."""
        if self.recording_bytes:
            keys = [ids_key(w.unit.context_ids) for w in queue]
            mine = [i for i, k in enumerate(keys) if self.recorded.get(k) == worker.name]
            fresh = [i for i, k in enumerate(keys) if k not in self.recorded]
            position = (mine or fresh or [0])[0]
            queue.rotate(-position)
            unit = queue.popleft()
            queue.rotate(position)
            self.recorded[keys[position]] = worker.name
            return unit
        return queue.popleft()

    def _sizes(self) -> tuple[int, int]:
        """(actors, threads per CPU actor), checked against what the cluster has (an actor Ray cannot place would
        wait forever)."""
        total = self.ray.cluster_resources()
        if self.gpu:
            gpus = int(total.get("GPU", 0))
            count = self.options.actors or gpus
            if count < 1 or count > gpus:
                raise ValueError(f"{count} GPU actor(s) asked, the Ray cluster has {gpus} GPU(s)")
            return count, 0
        count = self.options.actors or 2
        nodes = [n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")]
        threads = self.options.threads or max(1, int(min(nodes, default=1)) // count)
        cpus = int(total.get("CPU", 0))
        if count * threads > cpus:
            raise ValueError(f"{count} actor(s) x {threads} thread(s) need {count * threads} CPUs; the Ray cluster "
                             f"has {cpus}: lower actors or threads")  # fmt: skip
        return count, threads

    def _start(self, config: BenchConfig, labels: RunLabels, identity: dict, n: int = 1) -> list[Worker]:
        """`n` new actors (their models load side by side), each with its model loaded and its identity checked."""
        workers = []
        for _ in range(n):
            name = f"{self.prefix}-{self.started}"
            self.started += 1
            options = self.actor_class.options(name=name, **self.resources)
            workers.append(Worker(name, options.remote(self.spec, self.threads, self.recording_bytes)))
        self.workers += workers
        self._check(config, labels, identity, workers)
        return workers

    def _check(self, config: BenchConfig, labels: RunLabels, identity: dict, workers: list[Worker]) -> None:
        """Every worker's run identity for `config` equals the driver's (it also waits for their models to load)."""
        for worker in workers:
            try:
                theirs = self.ray.get(worker.handle.identity.remote(config, labels.model))
            except self.died as err:
                raise RuntimeError(f"a Ray actor could not load the model {self.spec}: {err}") from None
            if theirs != identity:
                diff = "; ".join(identity_diff(identity, theirs))
                raise ValueError(f"a Ray actor's run identity differs from this process's ({diff}): give every node "
                                 "the same model, versions and device type")  # fmt: skip

    def _dead(self, worker: Worker) -> None:
        self.ray.kill(worker.handle)
        self.workers.remove(worker)
        self.recorded = {k: name for k, name in self.recorded.items() if name != worker.name}


class RayExecutor:
    """Runs one run's work units on a `RayPool`'s actors."""

    def __init__(self, pool: RayPool, config: BenchConfig, labels: RunLabels, identity: dict) -> None:
        self.pool, self.config, self.labels, self.identity = pool, config, labels, identity

    def run(self, work: list[WorkUnit], writer: RowWriter) -> None:
        self.pool.run(self.config, self.labels, self.identity, work, writer)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def died_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """The Ray errors that mean a worker died (not an error of the work itself)."""
    names = ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "ObjectLostError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))
