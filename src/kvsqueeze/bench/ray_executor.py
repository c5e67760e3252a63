"""The Ray executor: work units computed by Ray actors, on this machine or on a cluster.

Each actor loads the model once, by name (`loading.ModelSpec`: a model object is never shipped), and computes one
work unit at a time, streaming its events back (a Ray generator) so that rows are written as they come. GPU runs
(the driver's model on CUDA) give each actor one GPU (`num_gpus=1`); CPU actors claim `threads` CPUs each and run
torch on that many threads, so actors do not oversubscribe the cores. Before any work, every actor's run identity
(versions, model fingerprint, dtype, device type ...) must equal the driver's: a cluster node with another model file
or another transformers refuses to start rather than writing rows of another run under this run's id.

Faults: a unit whose actor dies (killed, out of memory, node lost) runs again, less what was written, on a fresh
actor, up to `retries` times; then its missing rows go to failed.jsonl naming the error. An exception raised by the
work itself (a bad method option, say) stops the run as it would stop a serial one. Ctrl-C kills the actors; the
rows written stay, and the rerun (serial or Ray) computes the rest.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.folder import identity_diff, run_identity
from kvsqueeze.bench.work import Evaluator, Event, RunLabels, WorkUnit, replan
from kvsqueeze.bench.writer import RowWriter
from kvsqueeze.loading import ModelSpec
from kvsqueeze.validation import check_int

logger = logging.getLogger("kvsqueeze")

INSTALL = "the Ray executor needs Ray: pip install 'kvsqueeze[ray]'"
ACTOR_PREFIX = "kvsqueeze-bench"  # actors are named ACTOR_PREFIX-<run id>-<driver pid>-<n> (`ray list actors`)
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
    """What runs inside one Ray actor: the model, loaded once, and an evaluator over it."""

    def __init__(self, spec: ModelSpec, config: BenchConfig, labels: RunLabels, threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        model, tokenizer = spec.load()
        self.identity = run_identity(model, tokenizer, config, labels.model)
        self.evaluator = Evaluator(model, tokenizer, config, labels)

    def ready(self) -> dict[str, Any]:
        """This actor's run identity, once its model is loaded."""
        return self.identity

    def pid(self) -> int:
        """The actor's process id (call it with `.options(concurrency_group="control")` to run it beside a unit in
        progress)."""
        return os.getpid()

    def evaluate(self, work: WorkUnit) -> Iterator[Event]:
        yield from self.evaluator.evaluate(work)


class RayExecutor:
    """Runs work units on Ray actors (see the module docstring)."""

    def __init__(
        self, spec: ModelSpec, config: BenchConfig, labels: RunLabels, identity: dict, options: RayOptions
    ) -> None:
        self.ray = import_ray()
        self.died = died_errors(self.ray)
        self.spec, self.config, self.labels, self.identity, self.options = spec, config, labels, identity, options
        self.gpu = spec.device is not None and spec.device.startswith("cuda")
        self.actor_class: Any = None
        self.resources: dict[str, int] = {}  # what each actor asks Ray for
        self.threads: int | None = None  # torch threads of each CPU actor
        self.started = 0  # actors started so far (names them)
        self.actors: list[Any] = []  # alive actors this run started

    def run(self, work: list[WorkUnit], writer: RowWriter) -> None:
        ray = self.ray
        own = not ray.is_initialized()
        if own and self.options.address:
            ray.init(address=self.options.address)  # a running cluster, as it was started
        elif own:
            ray.init(address="local", include_dashboard=False)  # a new Ray on this machine, for this run alone
        try:
            if work:
                self._run(work, writer)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            if own:
                ray.shutdown()

    def _run(self, work: list[WorkUnit], writer: RowWriter) -> None:
        count, threads = self._sizes()
        logger.info("Ray: %d actor(s), %s each", count, "1 GPU" if self.gpu else f"{threads} CPU thread(s)")
        self.actor_class = self.ray.remote(concurrency_groups={"control": 1})(BenchActor)
        self.resources = {"num_gpus": 1} if self.gpu else {"num_cpus": threads}
        self.threads = None if self.gpu else threads
        idle = self._start(min(count, len(work)))
        queue, tries = deque(work), dict.fromkeys((w.index for w in work), 0)
        running: dict[Any, tuple[Any, WorkUnit]] = {}  # a unit's event stream -> (its actor, the unit)
        while queue or running:
            while idle and queue:
                unit = queue.popleft()
                actor = idle.pop()
                running[actor.evaluate.remote(unit)] = (actor, unit)
            ready, _ = self.ray.wait(list(running), num_returns=1, timeout=WAIT_SECONDS)
            for stream in ready:
                actor, unit = running[stream]
                try:
                    writer.take(self.ray.get(next(stream)))
                except StopIteration:
                    del running[stream]
                    idle.append(actor)
                except self.died as err:
                    del running[stream]
                    self._dead(actor)
                    idle += self._start()
                    tries[unit.index] += 1
                    again = replan(self.config, self.labels, unit, writer.done, set(writer.costs))
                    if tries[unit.index] <= self.options.retries:
                        logger.warning("Ray: an actor died (%s); its unit runs again", _first_line(err))
                        writer.run.retried_units += 1
                        queue.appendleft(again)
                    else:
                        writer.give_up(again, f"{type(err).__name__}: {_first_line(err)} (tried {tries[unit.index]}"
                                              " times)")  # fmt: skip

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

    def _start(self, n: int = 1) -> list[Any]:
        """`n` new actors (their models load side by side), each with its model loaded and its identity checked."""
        actors = []
        for _ in range(n):
            name = f"{ACTOR_PREFIX}-{self.labels.run}-{os.getpid()}-{self.started}"
            self.started += 1
            options = self.actor_class.options(name=name, **self.resources)
            actors.append(options.remote(self.spec, self.config, self.labels, self.threads))
        self.actors += actors
        for actor in actors:
            try:
                theirs = self.ray.get(actor.ready.remote())
            except self.died as err:
                raise RuntimeError(f"a Ray actor could not load the model {self.spec}: {err}") from None
            if theirs != self.identity:
                diff = "; ".join(identity_diff(self.identity, theirs))
                raise ValueError(f"a Ray actor's run identity differs from this process's ({diff}): give every node "
                                 "the same model, versions and device type")  # fmt: skip
        return actors

    def _dead(self, actor: Any) -> None:
        self.ray.kill(actor)
        self.actors.remove(actor)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def died_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """The Ray errors that mean a worker died (not an error of the work itself)."""
    names = ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "ObjectLostError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))
