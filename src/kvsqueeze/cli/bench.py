"""`kvsqueeze bench`: accuracy, memory and speed over a grid, resumable, then the report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from kvsqueeze.cli.arguments import (
    add_executor_options,
    add_parser,
    add_quant_layout_options,
    budget_policies,
    kv_bits_list,
    lengths,
    load_from_args,
    method_option,
    names,
    positive,
    ratios,
    ray_options,
    task_option,
)
from kvsqueeze.cli.logs import logger
from kvsqueeze.cli.report import write_and_print_report
from kvsqueeze.cli.tuned import add_config_argument, apply_to_bench

EXAMPLES = """examples:
  kvsqueeze bench
  kvsqueeze bench --suite full
  kvsqueeze bench --suite rank --model gemma3-270m
  kvsqueeze bench --tasks passkey_varied --task-option passkey_varied.phrasings=access_code,remember_code
  kvsqueeze bench --methods none,knorm,tova --ratios 0.25,0.5 --tasks niah_single,vt --lengths 1024,2048
  kvsqueeze bench --dataset mine.jsonl --methods none,snapkv --option snapkv.window=16
  kvsqueeze bench --budget-policy adakv --methods knorm,expected_attention --chunk-size 512 -q
  kvsqueeze bench --dtype bfloat16 --new-run     the default suite again in bfloat16, next to the float32 run
  kvsqueeze bench --executor ray --actors 2 --actor-threads 1      on 2 Ray actors on this machine
  kvsqueeze bench --executor ray --ray-address HEAD:6379 --device cuda   on a Ray cluster, one GPU per actor"""
IMPORTS = ["torch", "transformers", "kvsqueeze.bench.runner", "kvsqueeze.bench.report", "kvsqueeze.bench.ray_executor",
           "kvsqueeze.loading"]  # fmt: skip


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = add_parser(
        sub,
        "bench",
        parents,
        EXAMPLES,
        help="accuracy, memory and speed of methods x ratios x tasks x lengths, then a report",
        description="Run a benchmark grid (with no arguments: the default suite), then write a report. Finished rows\n"
        "are skipped on a rerun of the same command, so an interrupted run resumes where it stopped. A results\n"
        "directory holds one run, written by one bench at a time (see --out and --new-run).",
    )
    p.add_argument(
        "--suite",
        choices=["default", "full", "rank"],
        default="default",
        help="the grid the other options change: default (8 methods, 4 tasks, 4 samples), full (every registered "
        "method on niah_single and passkey, 2 samples) or rank (7 methods on passkey_varied and niah_varied at 1k "
        "and 2k, 96 questions per cell: about an hour on a CPU)",
    )
    p.add_argument("--methods", type=names, help="comma-separated methods; 'none' = no compression")
    p.add_argument("--ratios", type=ratios, help="comma-separated compression ratios in [0, 1)")
    p.add_argument("--tasks", type=names, help="comma-separated benchmark tasks")
    p.add_argument("--lengths", type=lengths, help="comma-separated context lengths in tokens")
    p.add_argument("--samples", type=positive, help="samples per task and length")
    p.add_argument("--seed", type=int, help="seed of the generated tasks")
    p.add_argument("--dataset", action="append", default=[], help="a .jsonl/.csv/.parquet file (repeatable)")
    p.add_argument("--option", action="append", default=[], type=method_option, help="METHOD.KEY=VALUE")
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        type=task_option,
        help="TASK.KEY=VALUE, a generated task's option, e.g. passkey_varied.phrasings=pass_key,magic_number (a list: "
        "comma-separated); part of the run's identity",
    )
    p.add_argument("--max-new-tokens", type=positive, default=None, help="override each sample's own")
    p.add_argument(
        "--query-aware",
        action="store_true",
        help="compress each question with the context (methods that need the question, e.g. finch, always do)",
    )
    p.add_argument(
        "--budget-policy",
        choices=budget_policies(),
        default=None,
        help="wrap every method in a budget policy (as in `generate`); rows are labelled e.g. adakv(knorm)",
    )
    p.add_argument("--chunk-size", type=positive, default=None, help="prefill each context in chunks of N tokens")
    p.add_argument("--decode-target", type=positive, default=None, help="while answering, compress to N tokens")
    p.add_argument("--decode-every", type=positive, default=32, help="... every K new tokens")
    p.add_argument(
        "--kv-bits",
        type=kv_bits_list,
        default=None,
        help="comma-separated bits: every cell also runs with its kept keys/values quantized to each (8, 4, 2; 16 or "
        "none = full precision); default: full precision only",
    )
    add_quant_layout_options(p)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: results/bench/default, or results/bench/custom-<hash of the grid>); it "
        "holds one run: a rerun with other settings (model, dtype, device, attention, answer length, query-aware, "
        "budget policy, chunking, versions) is refused, saying what differs",
    )
    p.add_argument(
        "--new-run",
        action="store_true",
        help="where --out holds another run, write into OUT-2 (OUT-3, ...) next to it instead: the first that is "
        "empty or holds this very run, so rerunning the same command resumes there",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_executor_options(p, "grid")
    add_config_argument(p)


def _bench_config(args: argparse.Namespace) -> Any:
    from kvsqueeze.bench.config import default_config

    if args.config is not None:
        apply_to_bench(args)
    grid = {"methods": args.methods, "ratios": args.ratios, "tasks": args.tasks, "lengths": args.lengths,
            "samples": args.samples, "seed": args.seed}  # fmt: skip
    forward = {"budget_policy": args.budget_policy, "chunk_size": args.chunk_size, "decode_target": args.decode_target}
    custom = any(v is not None for v in [*grid.values(), *forward.values()])
    custom = custom or bool(args.dataset or args.option or args.task_option or args.query_aware)
    if args.dataset and args.tasks is None:
        grid["tasks"] = []  # a dataset alone: no generated tasks
    options: dict[str, dict[str, Any]] = {}
    for method, key, value in args.option:
        if key == "ratio":
            raise ValueError(f"give ratios with --ratios, not --option {method}.ratio={value}")
        options.setdefault(method, {})[key] = value
    task_options: dict[str, dict[str, Any]] = {}
    for task, key, value in args.task_option:
        task_options.setdefault(task, {})[key] = value
    return default_config(args.suite, **grid, datasets=args.dataset, options=options, task_options=task_options,
                          query_aware=args.query_aware,
                          max_new_tokens=args.max_new_tokens, decode_every=args.decode_every, **forward,
                          name="custom" if custom else args.suite, **_quant_axis(args))  # fmt: skip


def _quant_axis(args: argparse.Namespace) -> dict[str, Any]:
    """bench's quantization axis. It does not make the grid custom nor name its folder: rows are keyed by their bits,
    so `--kv-bits` added to a command resumes in the folder of the same command without it."""
    bits = None if args.kv_bits is None else tuple(args.kv_bits)
    return {"kv_bits": bits, "kv_group_size": args.kv_group_size, "kv_residual": args.kv_residual}


def _default_out(config: Any, model: str) -> Path:
    """results/bench/default for the default suite, else a name derived from the grid (so a rerun resumes)."""
    import dataclasses
    import hashlib

    from kvsqueeze.bench.config import SUITES

    if config.name in SUITES and config.max_new_tokens is None:
        return Path("results") / "bench" / config.name
    quant_axis = ("kv_bits", "kv_group_size", "kv_residual")  # left out: see _quant_axis
    grid = {k: v for k, v in dataclasses.asdict(config).items() if k not in quant_axis}
    doc = json.dumps([grid, model], sort_keys=True, default=str)
    return Path("results") / "bench" / f"custom-{hashlib.sha1(doc.encode()).hexdigest()[:8]}"


def run(args: argparse.Namespace) -> int:
    from kvsqueeze.bench.folder import check_settings, settings_identity
    from kvsqueeze.bench.results import RESULTS
    from kvsqueeze.bench.runner import BenchInterrupted, run_bench
    from kvsqueeze.loading import DEFAULT_MODEL

    config = _bench_config(args)  # bad names, values and dataset files fail here, before the model loads
    ray = ray_options(args)  # so do the Ray options, and a missing Ray
    model_name = args.model or DEFAULT_MODEL
    out = args.out or _default_out(config, model_name)
    if not args.new_run:  # a folder of another run is refused now; the model's own fields are checked once loaded
        check_settings(out, settings_identity(config, model_name, args.dtype, args.attn))
    model, tokenizer = load_from_args(args)
    logger.info("Running the %s suite into %s ...", config.name, out)
    progress = not args.no_progress and args.log_level <= logging.INFO
    try:
        run = run_bench(model, tokenizer, config, out, model_name=model_name, progress=progress, new_run=args.new_run,
                        executor=args.executor, ray=ray)  # fmt: skip
    except BenchInterrupted as err:
        print(f"kvsqueeze: interrupted; finished rows are in {err.run.out_dir / RESULTS}: rerun the same command to "
              "resume.", file=sys.stderr)  # fmt: skip
        return 130
    except KeyboardInterrupt:
        print("kvsqueeze: interrupted before any row was computed.", file=sys.stderr)
        return 130
    logger.info("%d rows computed, %d already there.", run.computed_rows, run.skipped_rows)
    if run.failed_rows:
        logger.warning("%d rows failed (see failed.jsonl); rerun the same command to compute them.", run.failed_rows)
    write_and_print_report(run.out_dir)
    return 0
