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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvsqueeze.bench.dataset import dataset_hash, load_dataset
from kvsqueeze.bench.folder import identity_id, open_folder, run_identity, versions, write_config
from kvsqueeze.bench.memory import PeakMemory
from kvsqueeze.bench.metrics import score
from kvsqueeze.bench.recordings import RecordingStore
from kvsqueeze.bench.results import (
    COSTS,
    NONE,
    RESULTS,
    Appender,
    content_hash,
    cost_key,
    read_run,
    row_key,
    supersede,
)
from kvsqueeze.bench.tasks import Sample, Task, get_task, list_tasks
from kvsqueeze.cache import KVCache
from kvsqueeze.generation import answer
from kvsqueeze.memory import cache_stats
from kvsqueeze.methods import Method, get_method, list_methods
from kvsqueeze.methods.registry import BUDGET_POLICIES, with_budget_policy
from kvsqueeze.models import get_adapter
from kvsqueeze.pipeline import check_length, generate_encoded, prefill
from kvsqueeze.prompts import encode_prompt, encode_query_aware, question_token_count
from kvsqueeze.quantization import QuantSpec, quant_spec
from kvsqueeze.recording import Recording, compress_recording, record
from kvsqueeze.validation import check_int, check_ratio

logger = logging.getLogger("kvsqueeze")


# The suite `kvsqueeze bench` runs with no arguments (names that are not registered are left out). Tasks are those
# where the uncompressed SmolLM2-135M scores well at 1k tokens (benchmarks/results/task_accuracy.md): on vt, cwe, fwe
# and qa it is near chance, so compression could not show a difference there.
DEFAULT_SUITE: dict[str, Any] = {
    "name": "default",
    "methods": (NONE, "knorm", "snapkv", "streaming_llm", "expected_attention", "qfilters"),
    "ratios": (0.25, 0.5, 0.75),
    "tasks": ("niah_single", "niah_multikey", "niah_multiquery", "passkey"),
    "lengths": (1024,),
    "samples": 4,
    "seed": 0,
}


@dataclass
class BenchConfig:
    """What to run. Method names come from the method registry ('none' = no compression), tasks from the task
    registry; datasets are user files (every sample of a dataset is used; `samples` applies to tasks)."""

    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    tasks: tuple[str, ...] = ()
    lengths: tuple[int, ...] = ()
    samples: int = 4
    seed: int = 0
    datasets: tuple[str, ...] = ()
    query_aware: bool = False
    max_new_tokens: int | None = None  # overrides each sample's own
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method name -> options, e.g. window=8
    # task name -> options, e.g. {"passkey_varied": {"phrasings": ["magic_number"]}}; stored as the task holds them
    # (tuples as lists), so the same options given two ways are one run identity
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # how every compressed cell runs (the uncompressed 'none' cell is left as it is):
    budget_policy: str | None = None  # wrap each method in this policy (a key of BUDGET_POLICIES), e.g. "adakv"
    chunk_size: int | None = None  # prefill in chunks of this many tokens, compressing after each
    decode_target: int | None = None  # while answering, compress back to this many tokens per head ...
    decode_every: int = 32  # ... every this many new tokens
    # every cell (the uncompressed one included) also runs with its kept keys/values quantized to each of these bits
    # (None = full precision, the model's dtype; 16 and 32 are read as None): the quantization axis of the grid
    kv_bits: tuple[int | None, ...] = (None,)
    kv_group_size: int = 32  # quantized cells: tokens per key group, channels per value group
    kv_residual: int = 64  # quantized cells: newest tokens per (row, head) kept in full precision
    name: str = "custom"

    def __post_init__(self) -> None:
        self.methods = tuple(m.strip().lower().replace("-", "_") for m in self.methods)
        self.options = {k.strip().lower().replace("-", "_"): dict(v) for k, v in self.options.items()}
        self.ratios, self.lengths = tuple(self.ratios), tuple(self.lengths)
        self.tasks, self.datasets = tuple(self.tasks), tuple(str(d) for d in self.datasets)
        if not self.methods:
            raise ValueError("give at least one method")
        for ratio in self.ratios:
            check_ratio(ratio)
        if not self.ratios and any(m != NONE for m in self.methods):
            raise ValueError("give at least one ratio")
        for length in self.lengths:
            check_int("context length", length, 1)
        check_int("samples", self.samples, 1)
        check_int("seed", self.seed)
        if self.budget_policy is not None and self.budget_policy not in BUDGET_POLICIES:
            known = ", ".join(sorted(BUDGET_POLICIES))
            raise ValueError(f"unknown budget policy {self.budget_policy!r}; known: {known}")
        for key in ("chunk_size", "decode_target", "decode_every"):
            check_int(key, getattr(self, key), 1, none_ok=True)
        check_int("max_new_tokens", self.max_new_tokens, 1, none_ok=True)
        self.kv_bits = full_precision_as_none(self.kv_bits)
        for bits in self.kv_bits:
            quant_spec(bits, self.kv_group_size, self.kv_residual)  # ValueError naming the bad value
        if not self.tasks and not self.datasets:
            raise ValueError(f"give at least one task (known: {', '.join(list_tasks()) or 'none'}) or a dataset")
        if self.tasks and not self.lengths:
            raise ValueError("tasks need at least one context length")
        for task in self.tasks:
            get_task(task)  # unknown names raise ValueError with close matches
        self.task_options = {task: task_options(task, opts, self.tasks) for task, opts in self.task_options.items()}
        for path in self.datasets:
            load_dataset(path)  # an unreadable file or a bad row fails now, before a model loads
        for method in self.options:
            if method not in self.methods:
                raise ValueError(f"options given for {method!r}, which is not among the methods {list(self.methods)}")
        self.cells()  # builds every method at every ratio: bad names or ratios fail now, not mid-run

    def cells(self) -> list[tuple[str, Method | None, float]]:
        """(method name, method or None, ratio) for every compression run on each context."""
        out: list[tuple[str, Method | None, float]] = []
        for name in self.methods:
            if name == NONE:
                out.append((NONE, None, 0.0))
            else:
                opts = self.options.get(name, {})
                label = name if self.budget_policy is None else f"{BUDGET_POLICIES[self.budget_policy]}({name})"
                for r in self.ratios:
                    method = with_budget_policy(self.budget_policy, get_method(name, ratio=float(r), **opts), float(r))
                    out.append((label, method, float(r)))
        return out

    def quant(self, bits: int | None) -> QuantSpec | None:
        """How a cell at `bits` (one of `kv_bits`) stores its cache: None for full precision."""
        return quant_spec(bits, self.kv_group_size, self.kv_residual)

    def task(self, name: str) -> Task:
        """The task `name` built with its options."""
        return get_task(name, **self.task_options.get(name, {}))

    @property
    def forward_time(self) -> bool:
        """True when compression must run inside the real forward (chunked prefill, compression while answering)."""
        return self.chunk_size is not None or self.decode_target is not None

    def run_fields(self) -> dict[str, Any]:
        """How the compressed cells run, stored in every row (only what differs from a one-shot prefill)."""
        out: dict[str, Any] = {}
        if self.chunk_size is not None:
            out["chunk_size"] = self.chunk_size
        if self.decode_target is not None:
            out["decode_target"], out["decode_every"] = self.decode_target, self.decode_every
        return out

    def quant_fields(self, bits: int | None) -> dict[str, Any]:
        """The quantization of a cell at `bits`, stored in its rows: kv_bits (None: full precision), and for
        quantized cells the group size and residual."""
        if bits is None:
            return {"kv_bits": None}
        return {"kv_bits": bits, "kv_group_size": self.kv_group_size, "kv_residual": self.kv_residual}


FULL_PRECISION = (16, 32)  # `kv_bits` values that mean "not quantized", as None does


def full_precision_as_none(values: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """`values` with 16 and 32 read as None (full precision), duplicates dropped, order kept; at least one."""
    out = tuple(dict.fromkeys(None if v in FULL_PRECISION else v for v in values))
    if not out:
        raise ValueError("kv_bits needs at least one value (None = full precision)")
    return out


def task_options(task: str, options: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, Any]:
    """`options` of `task` (one of `tasks`) checked by building the task, as the task holds them, JSON-shaped."""
    if task not in tasks:
        raise ValueError(f"options given for the task {task!r}, which is not among the tasks {list(tasks)}")
    built = get_task(task, **options)  # unknown options or bad values raise ValueError
    return {key: json.loads(json.dumps(getattr(built, key))) for key in sorted(options)}


# `kvsqueeze bench --suite full`: every registered method (ALL_METHODS is expanded when the suite is built) on two
# retrieval tasks, fewer samples, so that the whole catalog runs in well under an hour on 2 CPU cores.
ALL_METHODS = "*"
FULL_SUITE: dict[str, Any] = {
    "name": "full",
    "methods": (NONE, ALL_METHODS),
    "ratios": (0.25, 0.5, 0.75),
    "tasks": ("niah_single", "passkey"),
    "lengths": (1024,),
    "samples": 2,
    "seed": 0,
    "options": {"think": {"scorer": "snapkv"}},  # ThinK alone keeps every token: the ratio goes to its scorer
}
# `kvsqueeze bench --suite rank`: a ranking of the seed methods (KNorm, Expected Attention, Q-Filters) and the strongest
# cheap others (TOVA, LU-KV, KeyDiff) on the varied tasks, at 1k and 2k tokens.
#
# Size. A cell (method, ratio) pools 2 tasks x 2 lengths x 24 samples = 96 questions (24 is a multiple of the 3
# sources, 4 phrasings and 3 formats, so each is drawn equally often). Two cells answer the same questions, so they
# are compared with the exact McNemar test on the questions where they differ (`statistics.mcnemar_power`, p < 0.05).
# A 15-point difference is found with probability 0.998 when the better cell loses no question the other answers
# (wins 15% of the questions), 0.82 when it also loses 5% (wins 20%), 0.65 when it loses 10% (wins 25%); 80% power
# needs 52, 92 and 132 questions in those three cases, and 40 is the floor (6 of 6 discordant questions: p = 0.031).
# Comparing two Wilson intervals instead would not do: at 96 questions each is about ±8 to ±10 points wide (77/96:
# [71.1, 86.9]; 48/96: [40.2, 59.8]), and an unpaired test needs about 167 questions per cell for 50% vs 65%.
# Per task or per length a cell holds 48 questions: there a 15-point loss with no win back is found with
# probability 0.75.
#
# Time. Measured on one thread of this 2-core CPU (a process alone on its core, other jobs on the other one;
# SmolLM2-135M, shared prefill as the runner does it): recording a context and answering its question in all 19
# cells takes 35 s at 1k tokens and 42 s at 2k, so the 96 contexts take about 61 minutes, plus about 5 minutes of
# cost passes (one real run per method, ratio and length) and the one-off calibrations of Q-Filters and LU-KV; two
# threads on a quiet machine take less. KVzip is left out: it replays the context once per ratio and context, 14 s
# per answer at 1k and 35 to 44 s at 2k (10 to 30 times a cell here), which alone would add about 2 hours at three
# ratios; add it with --methods for a longer run. With --model gemma3-270m a context records in about the same time
# and each answer takes about twice as long (1k tokens, one thread: 4.7 s and 2.1 s against 4.5 s and 1.1 s).
RANK_SUITE: dict[str, Any] = {
    "name": "rank",
    "methods": (NONE, "knorm", "expected_attention", "qfilters", "tova", "lukv", "keydiff"),
    "ratios": (0.25, 0.5, 0.75),
    "tasks": ("passkey_varied", "niah_varied"),
    "lengths": (1024, 2048),
    "samples": 24,
    "seed": 0,
}
SUITES = {"default": DEFAULT_SUITE, "full": FULL_SUITE, "rank": RANK_SUITE}


def default_config(suite_name: str = "default", **overrides: Any) -> BenchConfig:
    """A named suite (SUITES: "default", "full", "rank"), keeping only registered methods and tasks, with `overrides`
    applied."""
    if suite_name not in SUITES:
        raise ValueError(f"unknown suite {suite_name!r}; known: {', '.join(SUITES)}")
    suite = dict(SUITES[suite_name])
    expanded: list[str] = []
    for m in suite["methods"]:
        expanded += list_methods() if m == ALL_METHODS else [m]
    suite["methods"] = tuple(expanded)
    known_methods, known_tasks = set(list_methods()), set(list_tasks())
    suite["methods"] = tuple(m for m in suite["methods"] if m == NONE or m in known_methods)
    suite["tasks"] = tuple(t for t in suite["tasks"] if t in known_tasks)
    suite_options = dict(suite.pop("options", {}))
    suite.update({k: v for k, v in overrides.items() if v is not None})
    # the suite's own method options (e.g. ThinK's token scorer) apply to its methods still in the grid; given
    # options win
    given = {k.strip().lower().replace("-", "_"): dict(v) for k, v in (overrides.get("options") or {}).items()}
    merged = {m: {**opts, **given.get(m, {})} for m, opts in suite_options.items() if m in suite["methods"]}
    suite["options"] = {**given, **merged}
    return BenchConfig(**suite)


@dataclass
class Unit:
    """One compression: a context (query-aware: with one question) and the questions asked after it."""

    sample: Sample
    length: int  # the context_length of its rows: the target length, or a dataset context's token count
    group: str  # rows sharing one cost pass: the length, or the dataset
    context_ids: list[int]
    question_indices: list[int]
    question_texts: list[str]
    max_new_tokens: int
    query_aware: bool = False  # each question compressed with the context (then one question per unit)
    question_tokens: int | None = None  # query-aware: how many of the compressed prompt's last tokens are the question
    contents: list[str] = field(init=False)  # results.content_hash of each question (what its rows are keyed by)

    def __post_init__(self) -> None:
        s = self.sample
        self.contents = [content_hash(self.context_ids, text, s.answers[qi], s.metric, self.max_new_tokens)
                         for qi, text in zip(self.question_indices, self.question_texts, strict=True)]  # fmt: skip


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


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_bench`, after the folder was chosen: `run` says where the finished rows are."""

    def __init__(self, run: BenchRun) -> None:
        super().__init__()
        self.run = run


def needs_question(method: Method | None) -> bool:
    """True for methods that only work with the question inside the compressed prompt (FINCH)."""
    return method is not None and "question" in method.needs


def cell_query_aware(config: BenchConfig, method: Method | None) -> bool:
    """Whether a cell compresses each question with its context: the run is query-aware or the method needs it."""
    return config.query_aware or needs_question(method)


def plan_units(model: Any, tokenizer: Any, config: BenchConfig) -> list[Unit]:
    """Every compression unit of the grid's contexts, checked against the model's maximum length. A query-agnostic
    run with a method that needs the question has both kinds of units (each cell uses those of its own mode)."""
    modes = sorted({cell_query_aware(config, method) for _, method, _ in config.cells()})
    units: list[Unit] = []
    for task in config.tasks:
        for length in config.lengths:
            for sample in config.task(task).samples(tokenizer, length, config.samples, config.seed):
                units += [u for aware in modes for u in _units(tokenizer, config, sample, length, str(length), aware)]
    for path in config.datasets:
        for sample in load_dataset(path):
            ids, _ = encode_prompt(tokenizer, sample.context, list(sample.questions), sample.answer_prefix)
            group = f"dataset:{sample.task}"
            units += [u for aware in modes for u in _units(tokenizer, config, sample, len(ids), group, aware)]
    max_positions = get_adapter(model).max_positions
    for u in units:
        try:
            check_length(max_positions, [u.context_ids], u.question_texts, tokenizer, u.max_new_tokens)
        except ValueError as err:
            raise ValueError(f"{u.sample.task} sample {u.sample.index} (length {u.length}): {err}") from None
    return units


def _units(
    tokenizer: Any, config: BenchConfig, sample: Sample, length: int, group: str, query_aware: bool
) -> list[Unit]:
    new = config.max_new_tokens or sample.max_new_tokens
    questions = list(sample.questions)
    if not query_aware:
        ids, texts = encode_prompt(tokenizer, sample.context, questions, sample.answer_prefix)
        return [Unit(sample, length, group, ids, list(range(len(questions))), texts, new)]
    out = []
    for i, q in enumerate(questions):
        ids, text = encode_query_aware(tokenizer, sample.context, q, sample.answer_prefix)
        n_question = question_token_count(tokenizer, sample.context, q, sample.answer_prefix)
        out.append(Unit(sample, length, group, ids, [i], [text], new, True, n_question))
    return out


def run_bench(
    model: Any,
    tokenizer: Any,
    config: BenchConfig,
    out_dir: str | Path,
    model_name: str | None = None,
    progress: bool = True,
    new_run: bool = False,
    recordings: RecordingStore | None = None,
) -> BenchRun:
    """Run the grid with an already-loaded model, appending rows to out_dir/results.jsonl (resumable). A folder that
    holds another run (other model, dtype, settings ...) is refused with what differs (ResultsError), unless
    `new_run`, which writes into the first of OUT-2, OUT-3, ... that is empty or holds this run (BenchRun.out_dir).
    A folder another bench is writing into raises FolderBusyError. Ctrl-C raises BenchInterrupted. `recordings`: a
    store of recorded prefills shared with other calls (`bench.recordings`), so a context is prefilled once in all."""
    name = model_name or str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
    units = plan_units(model, tokenizer, config)  # bad inputs fail here, before the folder is touched
    identity = run_identity(model, tokenizer, config, name)
    with open_folder(out_dir, identity, new_run) as out:
        run = BenchRun(out_dir=out, versions=versions(), run_id=identity_id(identity))
        try:
            _run_units(model, tokenizer, config, units, run, progress, identity, recordings)
        except KeyboardInterrupt:
            raise BenchInterrupted(run) from None
    return run


def _run_units(
    model: Any,
    tokenizer: Any,
    config: BenchConfig,
    units: list[Unit],
    run: BenchRun,
    progress: bool,
    identity: dict,
    recordings: RecordingStore | None = None,
) -> None:
    out, cells = run.out_dir, config.cells()
    found, cost_rows = read_run(out, run.run_id)
    rows = supersede(out, found, _edited(units, config))
    run.superseded_rows = len(found) - len(rows)
    name = identity["model"]
    datasets = {path: dataset_hash(path) for path in config.datasets}
    write_config(out, {"identity": identity, "run": run.run_id, "config": dataclasses.asdict(config), "model": name,
                       "versions": run.versions, "datasets": datasets})  # fmt: skip
    done = {row_key(r) for r in rows}
    ctx = _RunContext(model, tokenizer, config, name, run, {cost_key(c): c for c in cost_rows})
    ctx.recordings = recordings
    total = len(config.kv_bits) * sum(
        len(u.question_indices) for u in units for c in cells if cell_query_aware(config, c[1]) == u.query_aware
    )
    results, cost_file = Appender(out / RESULTS), Appender(out / COSTS)
    bar = tqdm(total=total, desc="bench", unit="answer", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for unit in units:
            ctx.recording = None
            for cell, bits in ((c, b) for c in cells for b in config.kv_bits):
                if cell_query_aware(config, cell[1]) != unit.query_aware:
                    continue  # the cell runs on the units of its own mode
                rows = [ctx.base_row(unit, qi, cell, bits) for qi in unit.question_indices]
                todo = [r for r in rows if row_key(r) not in done]
                run.skipped_rows += len(rows) - len(todo)
                bar.update(len(rows) - len(todo))
                if not todo and cost_key(rows[0]) in ctx.costs:
                    continue  # (rows done but their cost pass missing from costs.jsonl: it runs again, alone)
                for row in ctx.compute(unit, cell, bits, rows, cost_file):
                    if row_key(row) not in done:
                        results.write(row)
                        done.add(row_key(row))
                        run.computed_rows += 1
                        bar.update(1)
    finally:
        bar.close()
        results.close()
        cost_file.close()
        ctx.recording = None


def _edited(units: list[Unit], config: BenchConfig) -> Callable[[dict[str, Any]], bool]:
    """Whether a stored row asks a question of this run's datasets that the file no longer holds (it was edited)."""
    asked = {c for u in units for c in u.contents}
    groups = {f"dataset:{Path(path).stem}" for path in config.datasets}
    return lambda row: row.get("group") in groups and row["content"] not in asked


class _RunContext:
    """The state one run shares across units: model, costs measured so far, the current unit's recording."""

    def __init__(
        self, model: Any, tokenizer: Any, config: BenchConfig, name: str, run: BenchRun, costs: dict[tuple, dict]
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.name, self.run, self.costs = name, run, costs
        self.device = next(model.parameters()).device
        self.recording: Recording | None = None
        self.recordings: RecordingStore | None = None  # recordings shared with other runs
        self.warm = False
        self.warmed_methods: set[str] = set()

    def base_row(self, unit: Unit, qi: int, cell: tuple[str, Method | None, float], bits: int | None) -> dict[str, Any]:
        s, position = unit.sample, unit.question_indices.index(qi)
        return {
            "run": self.run.run_id, "content": unit.contents[position], "task": s.task,
            "context_length": unit.length, "context_tokens": len(unit.context_ids),
            "sample": s.index, "question_index": qi, "method": repr(cell[1]) if cell[1] is not None else NONE,
            "method_name": cell[0], "ratio": cell[2], "query_aware": unit.query_aware, "group": unit.group,
            "question": s.questions[qi], "answers": list(s.answers[qi]), "metric": s.metric,
            "answer_prefix": s.answer_prefix, "model": self.name, "seed": self.config.seed, "sample_meta": s.meta,
            **(self.config.run_fields() if cell[1] is not None else {}), **self.config.quant_fields(bits),
        }  # fmt: skip

    def compute(
        self,
        unit: Unit,
        cell: tuple[str, Method | None, float],
        bits: int | None,
        rows: list[dict],
        cost_file: Appender,
    ) -> Iterator[dict[str, Any]]:
        """Answer the unit's questions compressed with `cell`, its cache quantized to `bits` (None: full precision);
        yields the finished rows."""
        _, method, _ = cell
        method, quant = with_question(method, unit), self.config.quant(bits)
        ckey = cost_key(rows[0])
        if not self.warm:
            _warm_up(self.model)  # the first forward of a process is slow: keep it out of the first cost pass
            self.warm = True
        torch.manual_seed(self.config.seed)  # methods that draw random numbers give the same rows on a rerun
        try:
            if ckey not in self.costs:
                self._warm_method(cell[0], method, unit)
                predictions, before, after = self._cost_pass(unit, method, quant, rows[0], cost_file, ckey)
            elif method is None or (method.shared_prefill and not self.config.forward_time):
                predictions, before, after = self._from_recording(unit, method, quant)
            else:
                out = self._generate(unit, method, quant)
                predictions, before, after = out.answers, out.stats.kv_bytes_before, out.stats.kv_bytes_after
        except ValueError as err:
            raise ValueError(f"on {unit.sample.task} sample {unit.sample.index} (length {unit.length}): {err}") from err
        cost = self.costs[ckey]
        for row, prediction in zip(rows, predictions, strict=True):
            yield {
                **row,
                "prediction": prediction,
                "score": score(str(prediction), row["answers"], unit.sample.metric),
                "kv_bytes_before": before,
                "kv_bytes_after": after,
                **{k: cost[k] for k in _COST_FIELDS},
                "cost_sample": cost["sample"],
                "versions": self.run.versions,
            }

    def _generate(self, unit: Unit, method: Method | None, quant: QuantSpec | None) -> Any:
        """A real run (prefill, compress, answer); `quant`: the cache is quantized as it fills (`pipeline.prefill`)."""
        texts, rows = unit.question_texts, [0] * len(unit.question_texts)
        new, c = unit.max_new_tokens, self.config
        if method is None:  # the uncompressed baseline runs one-shot
            return generate_encoded(self.model, self.tokenizer, [unit.context_ids], texts, rows, None, new,
                                    quant=quant)  # fmt: skip
        return generate_encoded(self.model, self.tokenizer, [unit.context_ids], texts, rows, method, new,
                                c.chunk_size, c.decode_target, c.decode_every, quant=quant)  # fmt: skip

    def _warm_method(self, name: str, method: Method | None, unit: Unit) -> None:
        """Run a method once on a short prefix before its first cost pass, so one-off work (loading calibration
        statistics, first-call overheads) is not counted as its compression time. Best effort: errors are ignored."""
        if method is None or name in self.warmed_methods:
            return
        self.warmed_methods.add(name)
        ids = torch.tensor([unit.context_ids[:_WARM_TOKENS]], device=self.device)
        with contextlib.suppress(ValueError):  # e.g. a prefix shorter than a protected window: the real run will say
            prefill(self.model, ids, torch.ones_like(ids), method)

    def _cost_pass(
        self,
        unit: Unit,
        method: Method | None,
        quant: QuantSpec | None,
        row: dict[str, Any],
        cost_file: Appender,
        ckey: tuple,
    ) -> tuple[list[str], int, int]:
        with PeakMemory(self.device) as mem:
            out = self._generate(unit, method, quant)
        s = out.stats
        cost = {
            "run": self.run.run_id, "method": row["method"], "ratio": row["ratio"], "group": unit.group,
            "model": self.name, "seed": self.config.seed, "query_aware": unit.query_aware,
            **(self.config.run_fields() if method is not None else {}),
            **self.config.quant_fields(None if quant is None else quant.bits),
            "sample": f"{unit.sample.task}#{unit.sample.index}", "context_tokens": len(unit.context_ids),
            "prefill_seconds": s.prefill_seconds, "compression_seconds": s.compression_seconds,
            "decode_tokens_per_second": s.decode_tokens_per_second, "peak_memory_bytes": mem.peak_bytes,
            "kv_bytes_before": s.kv_bytes_before, "kv_bytes_after": s.kv_bytes_after, "device": str(self.device),
        }  # fmt: skip
        cost_file.write(cost)
        self.costs[ckey] = cost
        self.run.cost_passes += 1
        return list(out.answers), s.kv_bytes_before, s.kv_bytes_after

    def _from_recording(self, unit: Unit, method: Method | None, quant: QuantSpec | None) -> tuple[list[str], int, int]:
        """Answer from a compressed copy of the unit's full-precision recording, quantized after compression (the
        methods scored full-precision keys, as in a real run). Bytes before: the uncompressed full-precision cache."""
        if self.recording is None and self.recordings is not None:
            self.recording = self.recordings.get(unit.context_ids)
        if self.recording is None:
            self.recording = _record(self.model, unit.context_ids)
            self.run.prefills += 1
            if self.recordings is not None:
                self.recordings.put(unit.context_ids, self.recording)
        cache, log = compress_recording(self.recording, method)
        before = log.kv_bytes_before if log.bytes_before else cache_stats(cache).kv_bytes
        if quant is not None:
            cache.quantize(quant.bits, quant.group_size, quant.residual)
        after = cache_stats(cache).kv_bytes
        rows = [0] * len(unit.question_texts)
        texts = answer(self.model, self.tokenizer, cache, rows, unit.question_texts, unit.max_new_tokens).texts
        return texts, before, after


def with_question(method: Method | None, unit: Unit) -> Method | None:
    """`method` told the unit's question length (its `question_tokens` option) when it needs the question."""
    if unit.question_tokens is None or not needs_question(method) or not hasattr(method, "question_tokens"):
        return method
    return dataclasses.replace(method, question_tokens=unit.question_tokens)  # type: ignore[type-var]


_WARM_TOKENS = 512
_COST_FIELDS = ("prefill_seconds", "compression_seconds", "decode_tokens_per_second", "peak_memory_bytes")


@torch.no_grad()
def _warm_up(model: Any) -> None:
    ids = torch.ones(1, 16, dtype=torch.long, device=next(model.parameters()).device)
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


@torch.no_grad()
def _record(model: Any, context_ids: list[int]) -> Recording:
    """The uncompressed one-shot prefill of one context, with every full-attention layer's inputs."""
    ids = torch.tensor([context_ids], device=next(model.parameters()).device)
    cache = KVCache(model.config)
    with record(model, cache) as rec:
        mask = torch.ones_like(ids)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return rec
