"""The benchmark runner: a grid of methods x ratios x tasks x context lengths (and user datasets).

Each context is prefilled ONCE, uncompressed, keeping every layer's inputs (`recording.record`); each (method, ratio)
then compresses a copy (`press.compress_recording`) and answers all the context's questions from it (query-agnostic:
the question is not seen by the compression; `query_aware=True` puts each question in the compressed part instead).
Methods that need the question (`"question" in Method.needs`, e.g. FINCH) always run query-aware, also in a
query-agnostic run: each question is compressed with its context (its rows say `query_aware: true`) and the method is
told how many of the prompt's last tokens are the question (its `question_tokens` option).
Methods whose `shared_prefill` is False (chunked, decoding-time) run for real with `pipeline.generate_encoded`.

Time and memory come from a separate cost pass: for each (method, ratio, length) one real `generate_encoded` on one
sample (its answers are that sample's rows), with the peak memory it added. Every row is appended to
`results.jsonl` and flushed as soon as it is computed; a rerun skips the rows already there, so an interrupted run
loses nothing. The folder holds one run (`bench.folder`: its identity in config.json, a lock while a bench writes);
rows are keyed by that run and the question's content, so a dataset row edited since is computed again (its old row
moves to superseded.jsonl).

The modules below do the parts: `config` (the grid and the suites), `units` (the contexts), `work` (one context's
cells, computed by an `Evaluator`), `executors` / `ray_executor` (who computes the work units: this process, or Ray
actors) and `writer` (the driver alone writes rows, as they arrive, whichever executor computed them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvsqueeze.bench.config import SUITES, BenchConfig, default_config
from kvsqueeze.bench.dataset import dataset_hash
from kvsqueeze.bench.executors import EXECUTORS, Executor, SerialExecutor
from kvsqueeze.bench.folder import identity_id, open_folder, run_identity, versions, write_config
from kvsqueeze.bench.ray_executor import RayExecutor, RayOptions, RayPool
from kvsqueeze.bench.recordings import RecordingStore
from kvsqueeze.bench.results import cost_key, read_run, row_key, supersede
from kvsqueeze.bench.units import Unit, cell_query_aware, plan_units
from kvsqueeze.bench.work import Evaluator, RunLabels, plan_work
from kvsqueeze.bench.writer import BenchRun, RowWriter
from kvsqueeze.fingerprint import model_name as display_name
from kvsqueeze.loading import ModelSpec
from kvsqueeze.validation import check_choice

# the runner's names from before the grid, the units and the writer had modules of their own
__all__ = ["SUITES", "BenchConfig", "BenchInterrupted", "BenchRun", "default_config", "plan_units", "run_bench"]


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_bench`, after the folder was chosen: `run` says where the finished rows are."""

    def __init__(self, run: BenchRun) -> None:
        super().__init__()
        self.run = run


def run_bench(
    model: Any,
    tokenizer: Any,
    config: BenchConfig,
    out_dir: str | Path,
    model_name: str | None = None,
    progress: bool = True,
    new_run: bool = False,
    executor: str = "serial",
    ray: RayOptions | None = None,
    model_spec: ModelSpec | None = None,
    recordings: RecordingStore | None = None,
    ray_pool: RayPool | None = None,
) -> BenchRun:
    """Run the grid with an already-loaded model, appending rows to out_dir/results.jsonl (resumable). A folder that
    holds another run (other model, dtype, settings ...) is refused with what differs (ResultsError), unless
    `new_run`, which writes into the first of OUT-2, OUT-3, ... that is empty or holds this run (BenchRun.out_dir).
    A folder another bench is writing into raises FolderBusyError. Ctrl-C raises BenchInterrupted.

    `executor="ray"` computes the units on Ray actors (`ray`: RayOptions, e.g. a cluster's address and the number of
    actors), each loading the model by `model_spec` (default: `ModelSpec.of(model, model_name)`, the driver's model
    loaded again by its name). The executor is not part of the run: either one resumes the other's folder.

    `recordings`: a store of recorded prefills shared with other calls (`bench.recordings`), so that a context is
    prefilled once in all (serial runs only: Ray actors record their own). `ray_pool`: Ray actors kept across calls
    (for `executor="ray"`; it replaces `ray` and `model_spec`, and the caller closes it)."""
    check_choice("executor", executor, EXECUTORS)
    name = model_name or display_name(model)
    units = plan_units(model, tokenizer, config)  # bad inputs fail here, before the folder is touched
    identity = run_identity(model, tokenizer, config, name)
    labels = RunLabels(identity_id(identity), name, versions())
    runner: Executor = SerialExecutor(Evaluator(model, tokenizer, config, labels, recordings))
    own_pool = None  # a pool for this call alone, closed at its end
    if executor == "ray":  # Ray is imported here: a missing Ray fails before the folder is touched
        pool = ray_pool or RayPool(model_spec or ModelSpec.of(model, name), ray)
        own_pool = None if ray_pool else pool
        runner = RayExecutor(pool, config, labels, identity)
    with open_folder(out_dir, identity, new_run) as out, own_pool or contextlib.nullcontext():
        run = BenchRun(out_dir=out, versions=labels.versions, run_id=labels.run)
        try:
            _run_units(config, units, run, progress, identity, labels, runner)
        except KeyboardInterrupt:
            raise BenchInterrupted(run) from None
    return run


def _run_units(
    config: BenchConfig,
    units: list[Unit],
    run: BenchRun,
    progress: bool,
    identity: dict,
    labels: RunLabels,
    runner: Executor,
) -> None:
    out, cells = run.out_dir, config.cells()
    found, cost_rows = read_run(out, run.run_id)
    rows = supersede(out, found, _edited(units, config))
    run.superseded_rows = len(found) - len(rows)
    datasets = {path: dataset_hash(path) for path in config.datasets}
    write_config(out, {"identity": identity, "run": run.run_id, "config": dataclasses.asdict(config),
                       "model": labels.model, "versions": run.versions, "datasets": datasets})  # fmt: skip
    done, costs = {row_key(r) for r in rows}, {cost_key(c): c for c in cost_rows}
    work, run.skipped_rows = plan_work(config, labels, units, done, set(costs))
    total = len(config.kv_bits) * sum(
        len(u.question_indices) for u in units for c in cells if cell_query_aware(config, c[1]) == u.query_aware
    )
    bar = tqdm(total=total, desc="bench", unit="answer", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    bar.update(run.skipped_rows)
    writer = RowWriter(run, config, labels, done, costs, bar)
    try:
        runner.run(work, writer)
    finally:
        bar.close()
        writer.close()


def _edited(units: list[Unit], config: BenchConfig) -> Callable[[dict[str, Any]], bool]:
    """Whether a stored row asks a question of this run's datasets that the file no longer holds (it was edited)."""
    asked = {c for u in units for c in u.contents}
    groups = {f"dataset:{Path(path).stem}" for path in config.datasets}
    return lambda row: row.get("group") in groups and row["content"] not in asked
