"""Glue: tune a compression configuration on the user's data through the benchmark.

The samples (built-in tasks at given lengths, or the user's dataset files) are split into a tune part and a
held-out part (`split`), each written into the tune folder as a dataset file. Every evaluation is a small
`bench.run_bench` of one (method, ratio, kv_bits) cell over one part, into the tune folder: rows land in its
resumable results.jsonl (an interrupted tune reruns the same searches, answered from the rows already there), and one
`RecordingStore` is shared by all calls, so each context is prefilled once in all. For each candidate method `search`
finds the highest ratio that meets the target: with `target` (a share of the uncompressed score), the lower bound of the
95% paired bootstrap interval of the share it keeps of the uncompressed score on the same questions
(`statistics.kept_share`) is at least the target; with `target_score`, the lower bound of its score's own 95% interval
is at least that score. The
candidate point holding the fewest KV bytes is chosen and evaluated on the held-out part against no compression.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.dataset import dataset_hash, load_dataset
from kvsqueeze.bench.executors import EXECUTORS
from kvsqueeze.bench.ray_executor import RayOptions, RayPool
from kvsqueeze.bench.recordings import DEFAULT_MAX_BYTES, RecordingStore
from kvsqueeze.bench.results import NONE, ResultsError, read_run
from kvsqueeze.bench.runner import run_bench
from kvsqueeze.bench.statistics import Interval, PairedTest, kept_share, paired_test, score_interval
from kvsqueeze.bench.tasks import Sample, get_task
from kvsqueeze.fingerprint import model_name as display_name
from kvsqueeze.loading import ModelSpec
from kvsqueeze.methods import get_method, list_methods
from kvsqueeze.methods.registry import BUDGET_POLICIES
from kvsqueeze.tuning.config import TUNE_FILE, TuneChoice, write_choice
from kvsqueeze.tuning.search import SearchResult, check_grid, linear_grid, search
from kvsqueeze.tuning.split import HELDOUT_SPLIT, TUNE_SPLIT, split_samples, write_split
from kvsqueeze.validation import check_choice, check_float, check_int

logger = logging.getLogger("kvsqueeze")

DEFAULT_CANDIDATES = ("expected_attention", "knorm", "qfilters", "tova", "snapkv")


@dataclass
class TuneSpec:
    """What to tune on and for. `target`: the share of the uncompressed score to keep (on the tune part);
    `target_score`: an absolute score in [0, 1] instead (overrides `target` when given)."""

    tasks: tuple[str, ...] = ()
    lengths: tuple[int, ...] = ()
    samples: int = 20
    seed: int = 0
    datasets: tuple[str, ...] = ()
    target: float = 0.95
    target_score: float | None = None
    methods: tuple[str, ...] = DEFAULT_CANDIDATES
    grid: tuple[float, ...] = field(default_factory=linear_grid)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget_policy: str | None = None
    kv_bits: int | None = None
    tune_fraction: float = 0.5
    max_new_tokens: int | None = None
    chunk_sizes: tuple[int | None, ...] = (None,)  # prefill chunk sizes to try (None: the context in one forward)

    def __post_init__(self) -> None:
        self.tasks, self.lengths, self.datasets = tuple(self.tasks), tuple(self.lengths), tuple(map(str, self.datasets))
        self.methods = tuple(m.strip().lower().replace("-", "_") for m in self.methods)
        if self.methods == DEFAULT_CANDIDATES:
            self.methods = tuple(m for m in DEFAULT_CANDIDATES if m in list_methods())
        for m in self.methods:
            if m not in list_methods():
                raise ValueError(f"unknown method {m!r}; known: {', '.join(list_methods())}")
        if not self.methods:
            raise ValueError("give at least one candidate method")
        self.grid = check_grid(self.grid)
        check_float("target", self.target, 0.0, 1.0, low_open=True)
        if self.target_score is not None:
            check_float("target_score", self.target_score, 0.0, 1.0)
        check_int("samples", self.samples, 1)
        self.chunk_sizes = tuple(dict.fromkeys(self.chunk_sizes))
        if not self.chunk_sizes:
            raise ValueError("give at least one chunk size (None: the context in one forward)")
        for size in self.chunk_sizes:
            check_int("chunk size", size, 1, none_ok=True, note="context tokens per prefill forward; None: one")
        if self.budget_policy is not None and self.budget_policy not in BUDGET_POLICIES:
            raise ValueError(
                f"unknown budget policy {self.budget_policy!r}; known: {', '.join(sorted(BUDGET_POLICIES))}"
            )
        if self.kv_bits in (16, 32):
            self.kv_bits = None
        if not self.tasks and not self.datasets:
            raise ValueError("give built-in tasks (with lengths) or a dataset file to tune on")
        if self.tasks and not self.lengths:
            raise ValueError("tasks need at least one context length")
        for method, opts in self.options.items():
            if method not in self.methods:
                raise ValueError(f"options given for {method!r}, which is not among the methods {list(self.methods)}")
            get_method(method, ratio=self.grid[0], **opts)  # unknown or bad options fail now, naming them

    def candidates(self) -> list[tuple[str, int | None]]:
        """(method, chunk size) of every candidate, methods first."""
        return [(m, c) for m in self.methods for c in self.chunk_sizes]

    def bench_config(self, method: str, ratio: float, dataset: Path, chunk_size: int | None = None) -> BenchConfig:
        """The one-cell benchmark of `method` at `ratio` ('none': uncompressed) on `dataset`, its context prefilled
        in chunks of `chunk_size` tokens (None: in one forward)."""
        return BenchConfig(
            methods=(method,), ratios=() if method == NONE else (ratio,), datasets=(str(dataset),),
            options={method: self.options[method]} if method in self.options else {}, seed=self.seed,
            budget_policy=self.budget_policy, kv_bits=(None if method == NONE else self.kv_bits,),
            max_new_tokens=self.max_new_tokens, name="tune", chunk_size=None if method == NONE else chunk_size,
        )  # fmt: skip


@dataclass
class Probe:
    """One evaluated cell on one part: its per-question scores (ordered by question content), their mean and 95%
    interval, and the mean KV bytes kept."""

    method: str
    ratio: float
    scores: list[float]
    contents: list[str]
    score: float
    interval: Interval
    kv_bytes: float
    error: str | None = None  # why the method cannot run at this ratio on this data (then it does not meet the target)
    chunk_size: int | None = None  # the prefill's chunk size (None: one forward)
    kept: tuple[float, Interval] | None = None  # the share of the uncompressed score kept, with its paired interval


@dataclass
class Forwards:
    """Model passes a tune ran in this call, from the benchmark's counters: shared prefills (recordings), cost passes
    (one real prefill + compression + answer per cell) and answered rows (one answer pass each)."""

    prefills: int = 0
    cost_passes: int = 0
    answers: int = 0

    @property
    def total(self) -> int:
        return self.prefills + self.cost_passes + self.answers


@dataclass
class TuneResult:
    out_dir: Path
    threshold: float
    baseline: Probe
    searches: dict[str, SearchResult[Probe]]
    choice: TuneChoice | None
    heldout_baseline: Probe | None
    heldout: Probe | None
    paired: PairedTest | None
    forwards: Forwards
    search_forwards: int  # passes the searches need on the tune part (counted from the probes, resumed or not)
    grid_forwards: int  # what the full grid of candidates x ratios would need on the same part
    tune_questions: int
    heldout_questions: int
    config_path: Path | None = None
    target: float | None = None  # the share of the uncompressed score to keep (None: an absolute target score)


def collect_samples(tokenizer: Any, spec: TuneSpec) -> list[Sample]:
    out = [
        s for t in spec.tasks for n in spec.lengths for s in get_task(t).samples(tokenizer, n, spec.samples, spec.seed)
    ]
    for path in spec.datasets:
        out += load_dataset(path)
    return out


class _Evaluator:
    def __init__(
        self, model: Any, tokenizer: Any, spec: TuneSpec, out: Path, name: str | None, progress: bool,
        pool: RayPool | None,
    ) -> None:  # fmt: skip
        self.model, self.tokenizer, self.spec, self.out, self.name = model, tokenizer, spec, out, name
        self.progress, self.store, self.forwards, self.pool = progress, RecordingStore(), Forwards(), pool

    def __call__(self, method: str, ratio: float, dataset: Path, chunk_size: int | None = None) -> Probe:
        config = self.spec.bench_config(method, ratio, dataset, chunk_size)
        on = {"executor": "ray", "ray_pool": self.pool} if self.pool else {"recordings": self.store}
        try:
            run = run_bench(self.model, self.tokenizer, config, probe_folder(self.out, chunk_size), self.name,
                            self.progress, **on)  # fmt: skip
        except ResultsError:  # the folder holds another run, or is busy: the user's to resolve
            raise
        except ValueError as err:  # e.g. a budget too small for the method's protected tokens at this ratio
            if method == NONE:
                raise
            logger.warning("tune: %s at %.2f cannot run on %s (%s); counted as not meeting the target", method, ratio,
                           dataset.stem, err)  # fmt: skip
            return Probe(method, ratio, [], [], 0.0, Interval(0.0, 0.0, "none"), math.inf, str(err), chunk_size)
        self.forwards.prefills += run.prefills
        self.forwards.cost_passes += run.cost_passes
        self.forwards.answers += run.computed_rows
        label, _, _ = config.cells()[0]
        bits = config.kv_bits[0]
        rows, _ = read_run(run.out_dir, run.run_id)
        cell = (f"dataset:{dataset.stem}", label, config.cells()[0][2], bits)
        mine = sorted((r for r in rows if (r["group"], r["method_name"], r["ratio"], r.get("kv_bits")) == cell),
                      key=lambda r: r["content"])  # fmt: skip
        scores = [float(r["score"]) for r in mine]
        probe = Probe(method, ratio, scores, [r["content"] for r in mine], sum(scores) / len(scores),
                      score_interval([scores]), sum(r["kv_bytes_after"] for r in mine) / len(mine),
                      chunk_size=chunk_size)  # fmt: skip
        logger.info("tune: %s at %.2f on %s: %.3f [%.3f, %.3f]", method, ratio, dataset.stem, probe.score,
                    probe.interval.low, probe.interval.high)  # fmt: skip
        return probe


def tune(
    model: Any,
    tokenizer: Any,
    spec: TuneSpec,
    out_dir: str | Path,
    model_name: str | None = None,
    progress: bool = True,
    executor: str = "serial",
    ray: RayOptions | None = None,
    model_spec: ModelSpec | None = None,
) -> TuneResult:
    """Search, choose, check on held-out data, and write tune.json and tune_report.md into `out_dir`.

    `executor="ray"`: every probe's contexts are computed by one set of Ray actors kept for the whole tune (`ray`:
    their RayOptions; `model_spec`: how they load the model, by default the driver's model by `model_name`), each
    keeping the prefills it recorded, as the serial tune keeps them in this process."""
    check_choice("executor", executor, EXECUTORS)
    with contextlib.ExitStack() as stack:
        pool = None
        if executor == "ray":
            spec_ = model_spec or ModelSpec.of(model, model_name or display_name(model))
            pool = stack.enter_context(RayPool(spec_, ray, recording_bytes=DEFAULT_MAX_BYTES))
        return _tune(model, tokenizer, spec, Path(out_dir), model_name, progress, pool)


def _tune(
    model: Any, tokenizer: Any, spec: TuneSpec, out: Path, model_name: str | None, progress: bool,
    pool: RayPool | None,
) -> TuneResult:  # fmt: skip
    tune_part, held_part = split_samples(collect_samples(tokenizer, spec), spec.tune_fraction, spec.seed)
    tune_path, held_path = (
        write_split(tune_part, out / f"{TUNE_SPLIT}.jsonl"),
        write_split(held_part, out / f"{HELDOUT_SPLIT}.jsonl"),
    )
    evaluate = _Evaluator(model, tokenizer, spec, out, model_name, progress, pool)
    baseline = evaluate(NONE, 0.0, tune_path)
    threshold = spec.target_score if spec.target_score is not None else spec.target * baseline.score
    passes: Callable[[Probe], bool] = functools.partial(meets, threshold=threshold)
    if spec.target_score is None:
        passes = functools.partial(keeps, baseline=baseline, target=spec.target)
    searches = {candidate_label(m, c, spec): search(spec.grid, functools.partial(evaluate, m, dataset=tune_path,
                                                                                chunk_size=c), passes)
                for m, c in spec.candidates()}  # fmt: skip
    best = choose(searches)
    n_q, n_ctx = len(baseline.scores), len(tune_part)
    probes = sum(s.evaluations for s in searches.values())
    result = TuneResult(out, threshold, baseline, searches, None, None, None, None, evaluate.forwards,
                        n_ctx + (probes + 1) * (1 + n_q), n_ctx + (len(searches) * len(spec.grid) + 1) * (1 + n_q),
                        n_q, sum(len(s.questions) for s in held_part))  # fmt: skip
    result.target = spec.target if spec.target_score is None else None
    if best is not None:
        result.heldout_baseline = evaluate(NONE, 0.0, held_path)
        result.heldout = evaluate(best.method, best.ratio, held_path, best.chunk_size)
        result.paired = paired_test(result.heldout_baseline.scores, result.heldout.scores)
        keeps(result.heldout, result.heldout_baseline, spec.target)  # its kept share, for the report
        origin = provenance(spec, result, model_name, [tune_path, held_path])
        result.choice = TuneChoice(best.method, best.ratio, spec.options.get(best.method, {}), spec.budget_policy,
                                   spec.kv_bits, origin, best.chunk_size)  # fmt: skip
        result.config_path = write_choice(result.choice, out / TUNE_FILE)
    return result


def probe_folder(out: Path, chunk_size: int | None) -> Path:
    """Where a probe's benchmark rows go: the tune folder, or for chunked prefill (another benchmark run: the chunk
    size is part of a run's identity) its subfolder chunks-N."""
    return out if chunk_size is None else out / f"chunks-{chunk_size}"


def candidate_label(method: str, chunk_size: int | None, spec: TuneSpec) -> str:
    """A candidate's name in the searches and the report: the method, with its chunk size when several are tried."""
    if spec.chunk_sizes == (None,):
        return method
    return f"{method} (chunks of {chunk_size})" if chunk_size is not None else f"{method} (one forward)"


def meets(probe: Probe, threshold: float) -> bool:
    """Whether the lower bound of the probe's 95% interval reaches the threshold (an absolute target score)."""
    return probe.error is None and probe.interval.low >= threshold - 1e-12


def keeps(probe: Probe, baseline: Probe, target: float) -> bool:
    """Whether the probe keeps at least `target` of the baseline's score on the same questions: the lower bound of
    the paired bootstrap interval of the share kept (`statistics.kept_share`, set as `probe.kept`) reaches it."""
    if probe.error is not None:
        return False
    base = dict(zip(baseline.contents, baseline.scores, strict=True))
    missing = [c for c in probe.contents if c not in base]
    if missing:
        raise ValueError(f"{len(missing)} questions of {probe.method} at {probe.ratio} have no uncompressed score")
    probe.kept = kept_share([base[c] for c in probe.contents], probe.scores)
    return probe.kept[1].low >= target - 1e-12


def choose(searches: dict[str, SearchResult[Probe]]) -> Probe | None:
    """Of each method's best point, the one holding the fewest KV bytes (then the higher score, then the first)."""
    bests = [p for s in searches.values() for r, p, ok in s.probes if ok and r == s.best]
    return min(bests, key=lambda p: (p.kv_bytes, -p.score)) if bests else None


def provenance(spec: TuneSpec, result: TuneResult, model: str | None, splits: Sequence[Path]) -> dict[str, Any]:
    def described(p: Probe | None) -> dict[str, Any] | None:
        if p is None:
            return None
        kept = None if p.kept is None else {"share": p.kept[0], "interval": [p.kept[1].low, p.kept[1].high]}
        return {"score": p.score, "interval": [p.interval.low, p.interval.high], "questions": len(p.scores),
                "kv_bytes": p.kv_bytes, "kept": kept}  # fmt: skip

    chosen = choose(result.searches)
    return {
        "target": spec.target if spec.target_score is None else None, "target_score": spec.target_score,
        "threshold": result.threshold, "model": model, "tasks": list(spec.tasks), "lengths": list(spec.lengths),
        "samples": spec.samples, "seed": spec.seed, "datasets": {d: dataset_hash(d) for d in spec.datasets},
        "chunk_sizes": list(spec.chunk_sizes), "splits": {p.stem: dataset_hash(p) for p in splits},
        "candidates": list(result.searches), "grid": list(spec.grid),
        "tune": described(chosen), "tune_uncompressed": described(result.baseline),
        "heldout": described(result.heldout), "heldout_uncompressed": described(result.heldout_baseline),
        "heldout_paired": None if result.paired is None else {"test": result.paired.test,
                                                              "difference": result.paired.difference,
                                                              "p_value": result.paired.p_value},
    }  # fmt: skip
