"""`kvsqueeze generate`: compress a context once, then answer questions over it (or over a saved cache)."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from kvsqueeze.cli.arguments import (
    GENERATE_DEFAULTS,
    OPTION_HELP,
    add_parser,
    add_quant_layout_options,
    budget_policies,
    load_from_args,
    parse_option,
    positive,
    ratio,
)
from kvsqueeze.cli.files import check_input_file, check_output_file, read_text_file
from kvsqueeze.cli.logs import logger
from kvsqueeze.cli.tuned import add_config_argument, apply_to_generate

EXAMPLES = """examples:
  kvsqueeze generate --example
  kvsqueeze generate --example --method snapkv --ratio 0.25 --option window=32 --json
  kvsqueeze generate --context-file doc.txt --question "Who signed it?" --question "When?" --method tova
  kvsqueeze generate --example --method expected_attention --budget-policy adakv --chunk-size 512
  kvsqueeze generate --example --save-cache doc.safetensors --no-compare
  kvsqueeze generate --load-cache doc.safetensors --question "What is the secret access code?" --json"""

# what the command imports (see main.IMPORTS)
IMPORTS = [
    "torch",
    "transformers",
    "kvsqueeze.pipeline",
    "kvsqueeze.generation",
    "kvsqueeze.loading",
    "kvsqueeze.cachefile",
]


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = add_parser(
        sub,
        "generate",
        parents,
        EXAMPLES,
        help="compress a context once, then answer questions",
        description="Compress a context once (before the questions are seen), then answer each question over the\n"
        "compressed KV cache. With --example (a bundled document), the answers without compression are shown too.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--context-file", type=Path, help="text file holding the context")
    src.add_argument("--example", action="store_true", help="use the bundled example document and its question")
    src.add_argument("--load-cache", type=Path, help="answer over a context cache saved with --save-cache")
    p.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    # --method and --ratio default to None so that parse_args can tell them given from not given (--load-cache)
    p.add_argument(
        "--method",
        default=None,
        help=f"compression method (see `kvsqueeze list`); 'none' = off (default: {GENERATE_DEFAULTS['method']})",
    )
    p.add_argument(
        "--ratio",
        type=ratio,
        default=None,
        help=f"fraction of context tokens removed, in [0, 1) (default: {GENERATE_DEFAULTS['ratio']})",
    )
    p.add_argument("--option", action="append", default=[], type=parse_option, help=OPTION_HELP)
    p.add_argument(
        "--budget-policy",
        choices=budget_policies(),
        default=None,
        help="wrap --method (the scorer, with its --option) in a budget policy: adakv (heads of a layer pool their "
        "budget), criticalkv (two-stage, value-aware), global (one budget for all layers and heads), pyramid",
    )
    p.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also answer without compression and print both answers with the KV bytes of each "
        "(default: on with --example, off otherwise)",
    )
    p.add_argument("--answer-prefix", default=None, help="text the answer starts with")
    p.add_argument("--max-new-tokens", type=positive, default=32, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default); higher samples")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens this likely")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: the same seed gives the same answers")
    p.add_argument("--stop", action="append", default=[], help="a string that ends an answer (repeatable)")
    p.add_argument("--chunk-size", type=positive, default=None, help="prefill the context in chunks of N tokens")
    p.add_argument("--kv-bits", type=int, default=None, help="also quantize the kept keys/values to 8, 4 or 2 bits")
    add_quant_layout_options(p)
    p.add_argument("--decode-target", type=positive, default=None, help="while answering, compress to N tokens")
    p.add_argument("--decode-every", type=positive, default=32, help="... every K new tokens")
    p.add_argument("--save-cache", type=Path, default=None, help="save the compressed context (safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON document with answers and stats")
    add_config_argument(p)


def fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on other options: --compare (on with --example), --method and --ratio (left unset
    with --load-cache, where giving them is refused)."""
    if args.compare is None:
        args.compare = args.example
    if args.load_cache is None and args.config is None:  # with --config: filled in `run`, from the file
        fill_method_defaults(args)


def fill_method_defaults(args: argparse.Namespace) -> None:
    if args.load_cache is None:
        for name, value in GENERATE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)


def _load_example() -> dict[str, Any]:
    text = resources.files("kvsqueeze.data").joinpath("example.json").read_text(encoding="utf-8")
    return json.loads(text)


def _generate_inputs(args: argparse.Namespace) -> tuple[str, list[str], str]:
    """(context, questions, answer prefix) from --example or --context-file and --question."""
    if args.example:
        example = _load_example()
        prefix = example["answer_prefix"] if args.answer_prefix is None else args.answer_prefix
        return example["context"], args.question or [example["question"]], prefix
    context = read_text_file("context file", args.context_file)
    if not args.question:
        raise ValueError("give at least one --question")
    return context, args.question, args.answer_prefix or ""


def _generate_method(args: argparse.Namespace) -> Any:
    from kvsqueeze.methods import get_method
    from kvsqueeze.methods.registry import with_budget_policy

    options = dict(args.option)
    if "ratio" in options:
        raise ValueError(f"give the ratio with --ratio, not --option ratio={options['ratio']}")
    method = None if args.method.lower() == "none" else get_method(args.method, ratio=args.ratio, **options)
    if args.budget_policy is not None:
        if method is None:
            raise ValueError(f"--budget-policy {args.budget_policy} needs a scoring --method, not 'none'")
        method = with_budget_policy(args.budget_policy, method, args.ratio)
    return method


# what only compressing a context sets: meaningless with --load-cache, whose context was compressed when it was saved
_COMPRESSION_ONLY = ("method", "ratio", "option", "budget_policy", "chunk_size", "save_cache", "kv_bits", "config")


def _refuse_with_load_cache(args: argparse.Namespace) -> None:
    if args.compare:
        raise ValueError("--compare needs the context itself (--example or --context-file), not --load-cache")
    given = [f"--{name.replace('_', '-')}" for name in _COMPRESSION_ONLY if getattr(args, name) not in (None, [])]
    if given:
        raise ValueError(
            f"{', '.join(given)} cannot go with --load-cache: the saved context was compressed when it was saved "
            "(compress and save it again with --context-file ... --save-cache to change that)"
        )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """generate's sampling arguments from the command line, checked before any model loads."""
    from kvsqueeze.generation import Sampling

    kwargs = {"temperature": args.temperature, "top_p": args.top_p, "stop": args.stop, "seed": args.seed}
    Sampling(max_new_tokens=args.max_new_tokens, **kwargs)
    return kwargs


def _quantization(args: argparse.Namespace) -> dict[str, Any]:
    """generate's quantization arguments from the command line, checked before any model loads."""
    from kvsqueeze.quantization import quant_spec

    kwargs = {"kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size, "kv_residual": args.kv_residual}
    quant_spec(**kwargs)
    return kwargs


def run(args: argparse.Namespace) -> int:
    from kvsqueeze.pipeline import generate

    if args.load_cache:
        _refuse_with_load_cache(args)
        return _answer_saved(args)
    if args.config is not None:
        apply_to_generate(args)
        fill_method_defaults(args)
    context, questions, prefix = _generate_inputs(args)
    method = _generate_method(args)
    sampling = _sampling(args)
    quantization = _quantization(args)
    if args.save_cache:
        check_output_file("--save-cache", args.save_cache)
    model, tokenizer = load_from_args(args)

    def run(m: Any, decode_target: int | None, quant: dict[str, Any]) -> Any:
        return generate(model, tokenizer, context, questions, method=m, max_new_tokens=args.max_new_tokens,
                        answer_prefix=prefix, chunk_size=args.chunk_size, decode_target=decode_target,
                        decode_every=args.decode_every, **sampling, **quant)  # fmt: skip

    logger.info("Compressing with %r and answering %d question(s) ...", method, len(questions))
    out = run(method, args.decode_target, quantization)
    # the uncompressed answers: a second prefill (the library's shared-prefill path, press.record, only suits some
    # methods, and generate's statistics would have to be rebuilt here)
    baseline = None
    if args.compare and (method is not None or args.kv_bits is not None):
        logger.info("Answering again without compression, to compare ...")
        baseline = run(None, None, {})
    if args.json:
        doc = {"method": repr(method), "questions": questions, "answers": out.answers, "stats": out.stats.to_dict()}
        if baseline is not None:
            doc["uncompressed"] = {"answers": baseline.answers, "stats": baseline.stats.to_dict()}
        print(json.dumps(doc), flush=True)
    elif baseline is None:
        _print_human(method, questions, prefix, out)
    else:
        _print_comparison(method, questions, prefix, out, baseline)
    if args.save_cache:  # after the answers are out: a failed save (a full disk) loses nothing already computed
        from kvsqueeze.cachefile import save_cache

        template = bool(getattr(tokenizer, "chat_template", None))
        try:
            save_cache(args.save_cache, out.cache, model, method, extra={"chat_template": template})
        except OSError as err:
            print(f"kvsqueeze: error: could not save the cache to {str(args.save_cache)!r}: {err}", file=sys.stderr)
            return 1
        logger.info("Saved the compressed context to %s", args.save_cache)
    return 0


def _answer_saved(args: argparse.Namespace) -> int:
    from kvsqueeze.pipeline import answer_saved

    if not args.question:
        raise ValueError("give at least one --question")
    check_input_file("cache file", args.load_cache)
    sampling = _sampling(args)
    model, tokenizer = load_from_args(args)
    prefix = args.answer_prefix or ""
    answers, saved = answer_saved(model, tokenizer, args.load_cache, args.question, args.max_new_tokens, prefix,
                                  args.decode_target, args.decode_every, **sampling)  # fmt: skip
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


def _print_costs(s: Any) -> None:
    saved = 1 - s.kv_bytes_after / s.kv_bytes_before if s.kv_bytes_before else 0.0
    bits = f", {s.kv_bits}-bit" if s.kv_bits is not None else ""
    print(
        f"KV cache: {_mib(s.kv_bytes_before)} -> {_mib(s.kv_bytes_after)} ({saved:.1%} saved{bits}); "
        f"tokens {s.tokens_before} -> {s.tokens_after:.0f} per head"
    )
    print(
        f"prefill {s.prefill_seconds:.2f} s (compression {s.compression_seconds:.2f} s); "
        f"decode {s.decode_tokens_per_second:.1f} tokens/s"
    )


def _print_human(method: Any, questions: list[str], prefix: str, out: Any) -> None:
    print(f"method: {method!r}" if method is not None else "method: none (uncompressed)")
    for q, a in zip(questions, out.answers, strict=True):
        print(f"Q: {q}\nA: {(prefix + ' ') if prefix else ''}{a}")
    _print_costs(out.stats)


def _print_comparison(method: Any, questions: list[str], prefix: str, out: Any, baseline: Any) -> None:
    """Each question's answer from the full cache next to the one from the compressed cache."""
    full, kept = baseline.stats.kv_bytes_after, out.stats.kv_bytes_after
    print(f"Each question answered twice by the same model: from the full KV cache, and from the cache compressed by "
          f"{method!r}; where the answers differ, compression removed what the answer needed.")  # fmt: skip
    labels = [f"uncompressed ({_mib(full)} KV)", f"compressed   ({_mib(kept)} KV)"]
    width = max(map(len, labels))
    pairs = zip(questions, baseline.answers, out.answers, strict=True)
    for q, reference, answer in pairs:
        print(f"Q: {q}")
        for label, text in zip(labels, (reference, answer), strict=True):
            print(f"  {label:<{width}}  A: {(prefix + ' ') if prefix else ''}{text}")
    _print_costs(out.stats)
