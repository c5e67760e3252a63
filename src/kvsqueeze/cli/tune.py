"""`kvsqueeze tune`: the most compression that keeps quality on the user's data, written as tune.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from kvsqueeze.cli.arguments import (
    add_executor_options,
    add_parser,
    budget_policies,
    lengths,
    load_from_args,
    method_option,
    names,
    positive,
    ratios,
    ray_options,
)
from kvsqueeze.cli.logs import logger

EXAMPLES = """examples:
  kvsqueeze tune --dataset mine.jsonl                       keep 95% of the uncompressed score on your data
  kvsqueeze tune --tasks passkey,niah_single --lengths 1024 --samples 40 --target 0.95
  kvsqueeze tune --dataset mine.jsonl --target-score 0.8 --methods knorm,tova --grid 0.25,0.5,0.75
  kvsqueeze tune --dataset mine.jsonl --methods knorm --chunk-sizes none,512   one-shot and chunked prefill
  kvsqueeze tune --dataset mine.jsonl --executor ray --actors 2 --actor-threads 1   probes on 2 Ray actors
  kvsqueeze generate --config results/tune/default/tune.json --context-file doc.txt --question "..."
  kvsqueeze bench --config results/tune/default/tune.json --dataset other.jsonl"""
IMPORTS = ["torch", "transformers", "kvsqueeze.tuning", "kvsqueeze.tuning.report", "kvsqueeze.bench.report",
           "kvsqueeze.loading", "kvsqueeze.bench.ray_executor"]  # fmt: skip
DEFAULT_TASKS = ["niah_single", "niah_multikey", "niah_multiquery", "passkey"]


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = add_parser(
        sub,
        "tune",
        parents,
        EXAMPLES,
        help="find the most compression that keeps quality on your data; writes tune.json",
        description="For each candidate method, find by bisection over a ratio grid the highest ratio whose score on\n"
        "a tune split meets the target with the lower bound of its 95% interval; choose the point holding the fewest\n"
        "KV bytes, report it on a held-out split against no compression, and write tune.json (read by\n"
        "`generate --config` and `bench --config`). Rows go through the benchmark into --out: a rerun resumes.",
    )
    p.add_argument("--dataset", action="append", default=[], help="a .jsonl/.csv/.parquet file (repeatable)")
    p.add_argument("--tasks", type=names, default=None, help=f"built-in tasks (default without --dataset: "
                   f"{','.join(DEFAULT_TASKS)})")  # fmt: skip
    p.add_argument("--lengths", type=lengths, default=None, help="context lengths of the tasks (default: 1024)")
    p.add_argument("--samples", type=positive, default=20, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks and of the split")
    p.add_argument("--target", type=float, default=0.95, help="share of the uncompressed score to keep")
    p.add_argument("--target-score", type=float, default=None, help="an absolute score in [0, 1] instead")
    p.add_argument("--methods", type=names, default=None, help="candidates (default: expected_attention, knorm, "
                   "qfilters, tova, snapkv)")  # fmt: skip
    p.add_argument("--grid", type=ratios, default=None, help="increasing ratios to search (default 0.1,0.2,...,0.9)")
    p.add_argument("--option", action="append", default=[], type=method_option, help="METHOD.KEY=VALUE")
    p.add_argument("--budget-policy", choices=budget_policies(), default=None, help="wrap every candidate in it")
    p.add_argument("--kv-bits", type=int, default=None, help="quantize the kept keys/values to 8, 4 or 2 bits")
    p.add_argument("--chunk-sizes", type=chunk_sizes, default=None, help="prefill chunk sizes to try as candidates "
                   "beside each method, 'none' for one forward (e.g. none,512,1024; default: one forward)")  # fmt: skip
    p.add_argument("--tune-fraction", type=float, default=0.5, help="share of the samples tuned on; the rest: held out")
    p.add_argument("--max-new-tokens", type=positive, default=None, help="override each sample's own")
    p.add_argument("--out", type=Path, default=Path("results") / "tune" / "default", help="the tune folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_executor_options(p, "probes")


def chunk_sizes(text: str) -> list[int | None]:
    """'none,512' -> [None, 512]."""
    out: list[int | None] = []
    for item in filter(None, (t.strip().lower() for t in text.split(","))):
        out.append(None if item == "none" else positive(item))
    if not out:
        raise argparse.ArgumentTypeError("give chunk sizes, e.g. none,512")
    return out


def tune_spec(args: argparse.Namespace) -> Any:
    from kvsqueeze.tuning import DEFAULT_CANDIDATES, TuneSpec

    tasks = args.tasks if args.tasks is not None else ([] if args.dataset else DEFAULT_TASKS)
    options: dict[str, dict[str, Any]] = {}
    for method, key, value in args.option:
        options.setdefault(method, {})[key] = value
    extra: dict[str, Any] = {"grid": tuple(args.grid)} if args.grid else {}
    if args.chunk_sizes:
        extra["chunk_sizes"] = tuple(args.chunk_sizes)
    return TuneSpec(tasks=tuple(tasks), lengths=tuple(args.lengths or ([1024] if tasks else [])), samples=args.samples,
                    seed=args.seed, datasets=tuple(args.dataset), target=args.target, target_score=args.target_score,
                    methods=tuple(args.methods or DEFAULT_CANDIDATES), options=options,
                    budget_policy=args.budget_policy, kv_bits=args.kv_bits, tune_fraction=args.tune_fraction,
                    max_new_tokens=args.max_new_tokens, **extra)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from kvsqueeze.bench.report import write_report
    from kvsqueeze.loading import DEFAULT_MODEL
    from kvsqueeze.tuning import tune
    from kvsqueeze.tuning.report import render, write_tune_report

    spec = tune_spec(args)  # bad values fail here, before the model loads
    ray = ray_options(args)  # so do the Ray options, and a missing Ray
    model, tokenizer = load_from_args(args)
    progress = not args.no_progress and args.log_level <= logging.INFO
    try:
        result = tune(model, tokenizer, spec, args.out, model_name=args.model or DEFAULT_MODEL, progress=progress,
                      executor=args.executor, ray=ray)  # fmt: skip
    except KeyboardInterrupt:
        print(f"kvsqueeze: interrupted; finished rows are kept in {args.out}: rerun the same command to resume.",
              file=sys.stderr)  # fmt: skip
        return 130
    report = write_tune_report(result)
    files = write_report(args.out)  # the benchmark's own report of every probe (report.md, report.html)
    print(render(result))
    logger.info("Tune report: %s; every probe: %s", report, files.html)
    if result.config_path is None:
        return 1
    logger.info("Chosen configuration: %s", result.config_path)
    return 0
