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


# --budget-policy NAME wraps the --method scorer in this registered method
BUDGET_POLICIES = {"adakv": "adakv", "criticalkv": "criticalkv", "global": "global_budget", "pyramid": "pyramidkv"}


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
    p_gen.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2-135M)")
    p_gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p_gen.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention underneath kvsqueeze")
    p_gen.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p_gen.add_argument("--json", action="store_true", help="print one JSON document with answers and stats")
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
    from kvsqueeze.pipeline import generate

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
        method = get_method(BUDGET_POLICIES[args.budget_policy], ratio=args.ratio, scorer=method)
    logger.info("Loading model %s ...", args.model or "SmolLM2-135M-Instruct (embedded)")
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    logger.info("Compressing with %r and answering %d question(s) ...", method, len(questions))
    out = generate(model, tokenizer, context, questions, method=method, max_new_tokens=args.max_new_tokens,
                   answer_prefix=prefix, chunk_size=args.chunk_size)  # fmt: skip
    if args.json:
        doc = {"method": repr(method), "questions": questions, "answers": out.answers, "stats": out.stats.to_dict()}
        print(json.dumps(doc))
        return 0
    _print_human(method, questions, prefix, out)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return {"list": cmd_list, "generate": cmd_generate}[args.command](args)
    except (ValueError, TypeError, OSError, ModuleNotFoundError) as err:
        print(f"kvsqueeze: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
