"""What a benchmark runs: the grid (`BenchConfig`: methods x ratios x tasks x context lengths, datasets, how every
cell runs) and the named suites `kvsqueeze bench --suite` offers (`default_config`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvsqueeze.bench.dataset import load_dataset
from kvsqueeze.bench.results import NONE
from kvsqueeze.bench.tasks import Task, get_task, list_tasks
from kvsqueeze.methods import Method, get_method, list_methods
from kvsqueeze.methods.registry import BUDGET_POLICIES, with_budget_policy
from kvsqueeze.quantization import QuantSpec, quant_spec
from kvsqueeze.validation import check_int, check_ratio

# The suite `kvsqueeze bench` runs with no arguments (names that are not registered are left out). Tasks are those
# where the uncompressed SmolLM2-135M scores well at 1k tokens (benchmarks/results/task_accuracy.md): on vt, cwe, fwe
# and qa it is near chance, so compression could not show a difference there. Methods: the seed methods (KNorm,
# Expected Attention, Q-Filters), two classics (SnapKV, StreamingLLM), and the leaders of the rank suite's rankings
# (docs/results/rank-suite.md): LU-KV, first at every ratio on SmolLM2, and KeyDiff, in the second group on SmolLM2
# and first at 0.5 on Gemma 3 270M.
DEFAULT_SUITE: dict[str, Any] = {
    "name": "default",
    "methods": (NONE, "knorm", "snapkv", "streaming_llm", "expected_attention", "qfilters", "lukv", "keydiff"),
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
