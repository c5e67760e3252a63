"""The `kvsqueeze` command line: thin wrappers around library functions.

stdout carries results only (with --json: exactly one JSON document); logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from kvsqueeze import __version__
from kvsqueeze.methods.registry import BUDGET_POLICIES

logger = logging.getLogger("kvsqueeze")


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1) (the fraction of tokens removed), got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _ratios(text: str) -> list[float]:
    return [_ratio(t) for t in _names(text)]


def _lengths(text: str) -> list[int]:
    try:
        return [_positive(t) for t in _names(text)]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"context lengths must be integers >= 1, got {text!r}") from None


def _method_option(text: str) -> tuple[str, str, Any]:
    key, value = _parse_option(text)
    method, dot, name = key.partition(".")
    if not dot or not method or not name:
        raise argparse.ArgumentTypeError(f"--option expects METHOD.KEY=VALUE (e.g. snapkv.window=16), got {text!r}")
    return method, name, value


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="accuracy, memory and speed of methods x ratios x tasks x lengths, then a report",
        description="Run a benchmark grid (with no arguments: the default suite); finished rows are skipped on a rerun "
        "of the same command, so an interrupted run resumes where it stopped.",
    )
    p.add_argument(
        "--suite",
        choices=["default", "full"],
        default="default",
        help="the grid the other options change: default (6 methods, 4 tasks, 4 samples) or full (every registered "
        "method on niah_single and passkey, 2 samples)",
    )
    p.add_argument("--methods", type=_names, help="comma-separated methods; 'none' = no compression")
    p.add_argument("--ratios", type=_ratios, help="comma-separated compression ratios in [0, 1)")
    p.add_argument("--tasks", type=_names, help="comma-separated benchmark tasks")
    p.add_argument("--lengths", type=_lengths, help="comma-separated context lengths in tokens")
    p.add_argument("--samples", type=_positive, help="samples per task and length")
    p.add_argument("--seed", type=int, help="seed of the generated tasks")
    p.add_argument("--dataset", action="append", default=[], help="a .jsonl/.csv/.parquet file (repeatable)")
    p.add_argument("--option", action="append", default=[], type=_method_option, help="METHOD.KEY=VALUE")
    p.add_argument("--max-new-tokens", type=_positive, default=None, help="override each sample's own")
    p.add_argument(
        "--query-aware",
        action="store_true",
        help="compress each question with the context (methods that need the question, e.g. finch, always do)",
    )
    p.add_argument(
        "--budget-policy",
        choices=sorted(BUDGET_POLICIES),
        default=None,
        help="wrap every method in a budget policy (as in `generate`); rows are labelled e.g. adakv(knorm)",
    )
    p.add_argument("--chunk-size", type=_positive, default=None, help="prefill each context in chunks of N tokens")
    p.add_argument("--decode-target", type=_positive, default=None, help="while answering, compress to N tokens")
    p.add_argument("--decode-every", type=_positive, default=32, help="... every K new tokens (default 32)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: results/bench/default, or results/bench/custom-<hash of the grid>)",
    )
    p.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention underneath kvsqueeze")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p_report = sub.add_parser("report", help="(re)write the Markdown/HTML report and plots of a results directory")
    p_report.add_argument("results_dir", type=Path, help="a directory written by `kvsqueeze bench`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsqueeze", description="KV cache compression for Hugging Face LMs.")
    parser.add_argument("--version", action="version", version=f"kvsqueeze {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="list the compression methods")
    p_list.add_argument("--json", action="store_true", help="print one JSON array")

    p_gen = sub.add_parser("generate", help="compress a context once, then answer questions")
    src = p_gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--context-file", type=Path, help="text file holding the context")
    src.add_argument("--example", action="store_true", help="use the bundled example document and its question")
    src.add_argument("--load-cache", type=Path, help="answer over a context cache saved with --save-cache")
    p_gen.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    p_gen.add_argument("--method", default="knorm", help="compression method (see `kvsqueeze list`); 'none' = off")
    p_gen.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of context tokens removed, in [0, 1)")
    p_gen.add_argument("--option", action="append", default=[], type=_parse_option, help="method option KEY=VALUE")
    p_gen.add_argument(
        "--budget-policy",
        choices=sorted(BUDGET_POLICIES),
        default=None,
        help="wrap --method (the scorer, with its --option) in a budget policy: adakv (heads of a layer pool their "
        "budget), criticalkv (two-stage, value-aware), global (one budget for all layers and heads), pyramid",
    )
    p_gen.add_argument("--answer-prefix", default=None, help="text the answer starts with")
    p_gen.add_argument("--max-new-tokens", type=_positive, default=32)
    p_gen.add_argument("--chunk-size", type=_positive, default=None, help="prefill the context in chunks of N tokens")
    p_gen.add_argument("--decode-target", type=_positive, default=None, help="while answering, compress to N tokens")
    p_gen.add_argument("--decode-every", type=_positive, default=32, help="... every K new tokens (default 32)")
    p_gen.add_argument("--save-cache", type=Path, default=None, help="save the compressed context (safetensors)")
    p_gen.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2-135M)")
    p_gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p_gen.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention underneath kvsqueeze")
    p_gen.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p_gen.add_argument("--json", action="store_true", help="print one JSON document with answers and stats")

    p_cal = sub.add_parser("calibrate", help="calibrate a method on a model ahead of time (cached on disk)")
    p_cal.add_argument("method", help="method name (see `kvsqueeze list`; those marked [needs: calibration])")
    p_cal.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2-135M)")
    p_cal.add_argument("--option", action="append", default=[], type=_parse_option, help="method option KEY=VALUE")
    p_cal.add_argument("--force", action="store_true", help="compute again even if a cached artifact exists")
    p_cal.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p_cal.add_argument("--device", default=None, help="torch device, e.g. cuda")
    _add_bench_parser(sub)
    return parser


def _load_example() -> dict[str, Any]:
    text = resources.files("kvsqueeze.data").joinpath("example.json").read_text(encoding="utf-8")
    return json.loads(text)


def cmd_list(args: argparse.Namespace) -> int:
    from kvsqueeze.methods import describe_methods

    methods = describe_methods()
    if args.json:
        print(json.dumps(methods, default=str))
        return 0
    width = max(len(m["name"]) for m in methods)
    for m in methods:
        needs = f"  [needs: {', '.join(m['needs'])}]" if m["needs"] else ""
        print(f"{m['name']:<{width}}  {m['description']}{needs}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kvsqueeze.loading import load_model
    from kvsqueeze.methods import get_method
    from kvsqueeze.methods.registry import with_budget_policy
    from kvsqueeze.pipeline import generate

    if args.load_cache:
        return _answer_saved(args)
    if args.example:
        example = _load_example()
        context = example["context"]
        questions = args.question or [example["question"]]
        prefix = example["answer_prefix"] if args.answer_prefix is None else args.answer_prefix
    else:
        if not args.context_file.is_file():
            raise ValueError(f"context file {str(args.context_file)!r} does not exist")
        context = args.context_file.read_text(encoding="utf-8")
        questions, prefix = args.question, args.answer_prefix or ""
    if not questions:
        raise ValueError("give at least one --question")
    options = dict(args.option)
    method = None if args.method.lower() == "none" else get_method(args.method, ratio=args.ratio, **options)
    if args.budget_policy is not None:
        if method is None:
            raise ValueError(f"--budget-policy {args.budget_policy} needs a scoring --method, not 'none'")
        method = with_budget_policy(args.budget_policy, method, args.ratio)
    logger.info("Loading model %s ...", args.model or "SmolLM2-135M-Instruct (embedded)")
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    logger.info("Compressing with %r and answering %d question(s) ...", method, len(questions))
    out = generate(model, tokenizer, context, questions, method=method, max_new_tokens=args.max_new_tokens,
                   answer_prefix=prefix, chunk_size=args.chunk_size, decode_target=args.decode_target,
                   decode_every=args.decode_every)  # fmt: skip
    if args.save_cache:
        from kvsqueeze.cachefile import save_cache

        template = bool(getattr(tokenizer, "chat_template", None))
        save_cache(args.save_cache, out.cache, model, method, extra={"chat_template": template})
        logger.info("Saved the compressed context to %s", args.save_cache)
    if args.json:
        doc = {"method": repr(method), "questions": questions, "answers": out.answers, "stats": out.stats.to_dict()}
        print(json.dumps(doc))
        return 0
    _print_human(method, questions, prefix, out)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import time

    from kvsqueeze.calibration import read_info
    from kvsqueeze.loading import load_model
    from kvsqueeze.methods import get_method

    method = get_method(args.method, **dict(args.option))
    logger.info("Loading model %s ...", args.model or "SmolLM2-135M-Instruct (embedded)")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    start = time.perf_counter()
    path = method.calibrate(model, tokenizer=tokenizer, force=args.force)
    seconds = time.perf_counter() - start
    if path is None:
        print(f"{method.name} needs no calibration")
        return 0
    info = read_info(path)
    print(f"{method!r}: ready in {seconds:.1f} s (calibration took {info.get('seconds')} s when computed)")
    for key, value in info.get("results", {}).items():  # e.g. held-out accuracy of a learned predictor
        print(f"{key}: {value}")
    print(f"artifact: {path}")
    return 0


def _answer_saved(args: argparse.Namespace) -> int:
    from kvsqueeze.loading import load_model
    from kvsqueeze.pipeline import answer_saved

    if not args.question:
        raise ValueError("give at least one --question")
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    prefix = args.answer_prefix or ""
    answers, saved = answer_saved(model, tokenizer, args.load_cache, args.question, args.max_new_tokens, prefix,
                                  args.decode_target, args.decode_every)  # fmt: skip
    if args.json:
        doc = {"method": saved.method, "questions": args.question, "answers": answers, "seen": saved.seen,
               "loaded_from": str(args.load_cache)}  # fmt: skip
        print(json.dumps(doc))
        return 0
    print(f"loaded cache: {saved.method}, {saved.seen[0]} context tokens seen")
    for q, a in zip(args.question, answers, strict=True):
        print(f"Q: {q}\nA: {(prefix + ' ') if prefix else ''}{a}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _print_human(method: Any, questions: list[str], prefix: str, out: Any) -> None:
    s = out.stats
    print(f"method: {method!r}" if method is not None else "method: none (uncompressed)")
    for q, a in zip(questions, out.answers, strict=True):
        print(f"Q: {q}\nA: {(prefix + ' ') if prefix else ''}{a}")
    saved = 1 - s.kv_bytes_after / s.kv_bytes_before if s.kv_bytes_before else 0.0
    print(
        f"KV cache: {_mib(s.kv_bytes_before)} -> {_mib(s.kv_bytes_after)} ({saved:.1%} saved); "
        f"tokens {s.tokens_before} -> {s.tokens_after:.0f} per head"
    )
    print(
        f"prefill {s.prefill_seconds:.2f} s (compression {s.compression_seconds:.2f} s); "
        f"decode {s.decode_tokens_per_second:.1f} tokens/s"
    )


def _bench_config(args: argparse.Namespace) -> Any:
    from kvsqueeze.bench.runner import default_config

    grid = {"methods": args.methods, "ratios": args.ratios, "tasks": args.tasks, "lengths": args.lengths,
            "samples": args.samples, "seed": args.seed}  # fmt: skip
    forward = {"budget_policy": args.budget_policy, "chunk_size": args.chunk_size, "decode_target": args.decode_target}
    custom = any(v is not None for v in [*grid.values(), *forward.values()])
    custom = custom or bool(args.dataset or args.option or args.query_aware)
    if args.dataset and args.tasks is None:
        grid["tasks"] = []  # a dataset alone: no generated tasks
    options: dict[str, dict[str, Any]] = {}
    for method, key, value in args.option:
        options.setdefault(method, {})[key] = value
    return default_config(args.suite, **grid, datasets=args.dataset, options=options, query_aware=args.query_aware,
                          max_new_tokens=args.max_new_tokens, decode_every=args.decode_every, **forward,
                          name="custom" if custom else args.suite)  # fmt: skip


def _default_out(config: Any, model: str) -> Path:
    """results/bench/default for the default suite, else a name derived from the grid (so a rerun resumes)."""
    import dataclasses
    import hashlib

    from kvsqueeze.bench.runner import SUITES

    if config.name in SUITES and config.max_new_tokens is None:
        return Path("results") / "bench" / config.name
    doc = json.dumps([dataclasses.asdict(config), model], sort_keys=True, default=str)
    return Path("results") / "bench" / f"custom-{hashlib.sha1(doc.encode()).hexdigest()[:8]}"


def _print_tables(summary: Any) -> None:
    from kvsqueeze.bench.report import markdown_table, tables

    for title, header, rows in tables(summary)[:2]:
        print(f"\n{title}\n\n{markdown_table(header, rows)}")


def cmd_bench(args: argparse.Namespace) -> int:
    from kvsqueeze.bench.report import write_report
    from kvsqueeze.bench.results import RESULTS
    from kvsqueeze.bench.runner import run_bench
    from kvsqueeze.loading import DEFAULT_MODEL, load_model

    config = _bench_config(args)  # bad names or values fail here, before the model loads
    model_name = args.model or DEFAULT_MODEL
    out = args.out or _default_out(config, model_name)
    logger.info("Loading model %s ...", model_name)
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    logger.info("Running the %s suite into %s ...", config.name, out)
    try:
        run = run_bench(model, tokenizer, config, out, model_name=model_name, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"kvsqueeze: interrupted; finished rows are in {out / RESULTS}: rerun the same command to resume.",
              file=sys.stderr)  # fmt: skip
        return 130
    logger.info("%d rows computed, %d already there.", run.computed_rows, run.skipped_rows)
    files = write_report(out)
    _print_tables(files.summary)
    logger.info("Report: %s and %s", files.markdown, files.html)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kvsqueeze.bench.report import write_report

    files = write_report(args.results_dir)
    _print_tables(files.summary)
    logger.info("Report: %s and %s", files.markdown, files.html)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        commands = {
            "list": cmd_list,
            "generate": cmd_generate,
            "calibrate": cmd_calibrate,
            "bench": cmd_bench,
            "report": cmd_report,
        }
        return commands[args.command](args)
    except (ValueError, TypeError, OSError, ModuleNotFoundError) as err:
        print(f"kvsqueeze: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
