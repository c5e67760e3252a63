"""The `kvsqueeze` command line: thin wrappers around library functions.

stdout carries results only (with --json: exactly one JSON document); logs and progress go to stderr, through the
`kvsqueeze` logger only (other libraries' loggers are left as they are). Bad input (ValueError) and a missing file
the user named (FileNotFoundError) end with a one-line error and exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from kvsqueeze import __version__
from kvsqueeze.gguf_packages import GGUF_PACKAGES

logger = logging.getLogger("kvsqueeze")


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def option_value(raw: str) -> Any:
    """An --option VALUE as Python sees it: JSON first (8, 8.5, true, null, "text", [1, 2]), then True/False/None
    in any case, then an int or a float (nan and inf included), else the text itself. The method then checks the
    type: "8.5" for an integer option is refused, not rounded."""
    text = raw.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return raw


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    return key.strip(), option_value(raw)


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


def _kv_bits_list(text: str) -> list[int | None]:
    """--kv-bits 16,8,4,2: integers, with 'none' (and 16 or 32, as the bench reads them) for full precision; the
    bench checks the values (2, 4 or 8) before the model loads."""
    out: list[int | None] = []
    for token in _names(text):
        if token.lower() == "none":
            out.append(None)
            continue
        try:
            out.append(int(token))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bits must be 2, 4, 8, or 16/none for full precision; got {token!r}"
            ) from None
    return out


def _method_option(text: str) -> tuple[str, str, Any]:
    key, value = _parse_option(text)
    method, dot, name = key.partition(".")
    if not dot or not method or not name:
        raise argparse.ArgumentTypeError(f"--option expects METHOD.KEY=VALUE (e.g. snapkv.window=16), got {text!r}")
    return method, name, value


def _task_option(text: str) -> tuple[str, str, Any]:
    key, value = _parse_option(text)
    task, dot, name = key.partition(".")
    if not dot or not task or not name:
        raise argparse.ArgumentTypeError(
            f"--task-option expects TASK.KEY=VALUE (e.g. passkey_varied.phrasings=pass_key,magic_number), got {text!r}"
        )
    return task, name, value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default where it says something (not None, not a flag's) and keeps the description
    and the examples of the epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:  # the hook ArgumentDefaults... overrides too
        if action.nargs == 0 or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _logging_options(top: bool) -> argparse.ArgumentParser:
    """-v/-q, accepted before the subcommand and after it. Only the top parser sets the default (INFO): a subparser's
    default would overwrite a -v given before the subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    for flags, level, text in (
        (("-v", "--verbose"), logging.DEBUG, "debug messages on stderr"),
        (("-q", "--quiet"), logging.WARNING, "only warnings and errors on stderr (no progress bar)"),
    ):
        group.add_argument(*flags, dest="log_level", action="store_const", const=level, default=argparse.SUPPRESS,
                           help=text)  # fmt: skip
    if top:
        parent.set_defaults(log_level=logging.INFO)
    return parent


def _model_options() -> argparse.ArgumentParser:
    """The options that choose and place the model, shared by every subcommand that loads one."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help=f"a short name ({', '.join(GGUF_PACKAGES)}: a model shipped in a Python package, converted once) or a "
        "local model directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    group.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention underneath kvsqueeze")
    group.add_argument("--device", default=None, help="torch device, e.g. cuda (default: the CPU)")
    return parent


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from kvsqueeze.loading import check_device, load_model

    if args.device is not None:
        check_device(args.device)  # before the "Loading" line: a device this machine lacks is the only message
    logger.info("Loading model %s ...", args.model or "SmolLM2-135M-Instruct (embedded)")
    return load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)


_MAIN_EXAMPLES = """examples:
  kvsqueeze generate --example       answer a question about a bundled document, with and without compression
  kvsqueeze list                     the compression methods and their options
  kvsqueeze bench                    the default benchmark suite; report in results/bench/default
  kvsqueeze bench -v                 the same, with debug messages (-v/-q go before or after the subcommand)
  kvsqueeze serve                    an OpenAI-compatible server at http://127.0.0.1:8000/v1
  kvsqueeze COMMAND --help           the options of one command, with their defaults and examples"""

_EXAMPLES = {
    "list": """examples:
  kvsqueeze list
  kvsqueeze list --json | python -m json.tool""",
    "generate": """examples:
  kvsqueeze generate --example
  kvsqueeze generate --example --method snapkv --ratio 0.25 --option window=32 --json
  kvsqueeze generate --context-file doc.txt --question "Who signed it?" --question "When?" --method tova
  kvsqueeze generate --example --method expected_attention --budget-policy adakv --chunk-size 512
  kvsqueeze generate --example --save-cache doc.safetensors --no-compare
  kvsqueeze generate --load-cache doc.safetensors --question "What is the secret access code?" --json""",
    "calibrate": """examples:
  kvsqueeze calibrate qfilters
  kvsqueeze calibrate kvzap_mlp --force
  kvsqueeze calibrate qfilters --model path/to/model --option n_tokens=4096""",
    "bench": """examples:
  kvsqueeze bench
  kvsqueeze bench --suite full
  kvsqueeze bench --suite rank --model gemma3-270m
  kvsqueeze bench --tasks passkey_varied --task-option passkey_varied.phrasings=access_code,remember_code
  kvsqueeze bench --methods none,knorm,tova --ratios 0.25,0.5 --tasks niah_single,vt --lengths 1024,2048
  kvsqueeze bench --dataset mine.jsonl --methods none,snapkv --option snapkv.window=16
  kvsqueeze bench --budget-policy adakv --methods knorm,expected_attention --chunk-size 512 -q
  kvsqueeze bench --dtype bfloat16 --new-run     the default suite again in bfloat16, next to the float32 run""",
    "report": """examples:
  kvsqueeze report results/bench/default""",
    "serve": """examples:
  kvsqueeze serve                    the embedded model at http://127.0.0.1:8000/v1, knorm at ratio 0.5
  kvsqueeze serve --method expected_attention --ratio 0.75 --cache-dir contexts --max-cache-bytes 4GiB
  kvsqueeze serve --host 0.0.0.0 --port 9000 --api-key s3cret --max-tokens-limit 512""",
}


def _add_parser(sub: Any, name: str, parents: list[argparse.ArgumentParser], **kwargs: Any) -> Any:
    return sub.add_parser(name, parents=parents, formatter_class=_HelpFormatter, epilog=_EXAMPLES[name], **kwargs)


GENERATE_DEFAULTS = {"method": "knorm", "ratio": 0.5}
OPTION_HELP = "method option KEY=VALUE (VALUE read as JSON, or True/False/None; other text stays text)"


def _budget_policies() -> list[str]:
    """The budget policies' names, for --budget-policy's choices."""
    from kvsqueeze.methods.registry import BUDGET_POLICIES

    return sorted(BUDGET_POLICIES)


def _add_generate_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = _add_parser(
        sub,
        "generate",
        parents,
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
        type=_ratio,
        default=None,
        help=f"fraction of context tokens removed, in [0, 1) (default: {GENERATE_DEFAULTS['ratio']})",
    )
    p.add_argument("--option", action="append", default=[], type=_parse_option, help=OPTION_HELP)
    p.add_argument(
        "--budget-policy",
        choices=_budget_policies(),
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
    p.add_argument("--max-new-tokens", type=_positive, default=32, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default); higher samples")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens this likely")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: the same seed gives the same answers")
    p.add_argument("--stop", action="append", default=[], help="a string that ends an answer (repeatable)")
    p.add_argument("--chunk-size", type=_positive, default=None, help="prefill the context in chunks of N tokens")
    p.add_argument("--kv-bits", type=int, default=None, help="also quantize the kept keys/values to 8, 4 or 2 bits")
    p.add_argument("--kv-group-size", type=int, default=32, help="with --kv-bits: values sharing a scale and zero")
    p.add_argument("--kv-residual", type=int, default=64, help="with --kv-bits: newest tokens kept in full precision")
    p.add_argument("--decode-target", type=_positive, default=None, help="while answering, compress to N tokens")
    p.add_argument("--decode-every", type=_positive, default=32, help="... every K new tokens")
    p.add_argument("--save-cache", type=Path, default=None, help="save the compressed context (safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON document with answers and stats")


def _add_bench_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = _add_parser(
        sub,
        "bench",
        parents,
        help="accuracy, memory and speed of methods x ratios x tasks x lengths, then a report",
        description="Run a benchmark grid (with no arguments: the default suite), then write a report. Finished rows\n"
        "are skipped on a rerun of the same command, so an interrupted run resumes where it stopped. A results\n"
        "directory holds one run, written by one bench at a time (see --out and --new-run).",
    )
    p.add_argument(
        "--suite",
        choices=["default", "full", "rank"],
        default="default",
        help="the grid the other options change: default (6 methods, 4 tasks, 4 samples), full (every registered "
        "method on niah_single and passkey, 2 samples) or rank (7 methods on passkey_varied and niah_varied at 1k "
        "and 2k, 96 questions per cell: about an hour on a CPU)",
    )
    p.add_argument("--methods", type=_names, help="comma-separated methods; 'none' = no compression")
    p.add_argument("--ratios", type=_ratios, help="comma-separated compression ratios in [0, 1)")
    p.add_argument("--tasks", type=_names, help="comma-separated benchmark tasks")
    p.add_argument("--lengths", type=_lengths, help="comma-separated context lengths in tokens")
    p.add_argument("--samples", type=_positive, help="samples per task and length")
    p.add_argument("--seed", type=int, help="seed of the generated tasks")
    p.add_argument("--dataset", action="append", default=[], help="a .jsonl/.csv/.parquet file (repeatable)")
    p.add_argument("--option", action="append", default=[], type=_method_option, help="METHOD.KEY=VALUE")
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        type=_task_option,
        help="TASK.KEY=VALUE, a generated task's option, e.g. passkey_varied.phrasings=pass_key,magic_number (a list: "
        "comma-separated); part of the run's identity",
    )
    p.add_argument("--max-new-tokens", type=_positive, default=None, help="override each sample's own")
    p.add_argument(
        "--query-aware",
        action="store_true",
        help="compress each question with the context (methods that need the question, e.g. finch, always do)",
    )
    p.add_argument(
        "--budget-policy",
        choices=_budget_policies(),
        default=None,
        help="wrap every method in a budget policy (as in `generate`); rows are labelled e.g. adakv(knorm)",
    )
    p.add_argument("--chunk-size", type=_positive, default=None, help="prefill each context in chunks of N tokens")
    p.add_argument("--decode-target", type=_positive, default=None, help="while answering, compress to N tokens")
    p.add_argument("--decode-every", type=_positive, default=32, help="... every K new tokens")
    p.add_argument(
        "--kv-bits",
        type=_kv_bits_list,
        default=None,
        help="comma-separated bits: every cell also runs with its kept keys/values quantized to each (8, 4, 2; 16 or "
        "none = full precision); default: full precision only",
    )
    p.add_argument("--kv-group-size", type=int, default=32, help="with --kv-bits: values sharing a scale and zero")
    p.add_argument("--kv-residual", type=int, default=64, help="with --kv-bits: newest tokens kept in full precision")
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


def _size(text: str) -> int:
    from kvsqueeze.serve.settings import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_serve_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = _add_parser(
        sub,
        "serve",
        parents,
        help="an OpenAI-compatible server that compresses each context once and reuses it",
        description="Serve the model over HTTP with OpenAI's API (chat and completions, streaming or not). A long\n"
        "context (a document uploaded to /v1/contexts, or the messages before the last user message) is prefilled\n"
        'and compressed once, then reused by every request over it. Needs: pip install "kvsqueeze[serve]"',
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--method", default=GENERATE_DEFAULTS["method"], help="default compression method ('none' = off)")
    p.add_argument("--ratio", type=_ratio, default=GENERATE_DEFAULTS["ratio"], help="default compression ratio")
    p.add_argument("--option", action="append", default=[], type=_parse_option, help=OPTION_HELP)
    p.add_argument("--budget-policy", choices=_budget_policies(), default=None, help="wrap --method in a budget policy")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: the "
                   "KVSQUEEZE_API_KEY environment variable; unset: no key)")  # fmt: skip
    p.add_argument("--max-cache-bytes", type=_size, default="2GiB", help="bytes of compressed contexts kept in "
                   "memory (measured from their storages); least recently used dropped first")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=None, help="also keep compressed contexts in this folder, "
                   "so a restarted server reuses them")  # fmt: skip
    p.add_argument("--max-tokens-limit", type=_positive, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=_positive, default=None,
                   help="most context + question tokens of one request (default: the model's positions)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=_size, default="16MiB", help="largest request body")
    p.add_argument("--max-queue", type=_positive, default=64, help="requests waiting for the model (more: 503)")
    p.add_argument("--max-batch", type=_positive, default=8, help="requests decoded together (running rows)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsqueeze", description="KV cache compression for Hugging Face LMs.",
                                     parents=[_logging_options(top=True)], formatter_class=_HelpFormatter,
                                     epilog=_MAIN_EXAMPLES)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"kvsqueeze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    logs, model = _logging_options(top=False), _model_options()

    p_list = _add_parser(sub, "list", [logs], help="list the compression methods")
    p_list.add_argument("--json", action="store_true", help="print one JSON array")
    _add_generate_parser(sub, [logs, model])
    p_cal = _add_parser(sub, "calibrate", [logs, model],
                        help="calibrate a method on a model ahead of time (cached on disk)")  # fmt: skip
    p_cal.add_argument("method", help="method name (see `kvsqueeze list`; those marked [needs: calibration])")
    p_cal.add_argument("--option", action="append", default=[], type=_parse_option, help=OPTION_HELP)
    p_cal.add_argument("--force", action="store_true", help="compute again even if a cached artifact exists")
    _add_bench_parser(sub, [logs, model])
    _add_serve_parser(sub, [logs, model])
    p_report = _add_parser(sub, "report", [logs],
                           help="(re)write the Markdown/HTML report and plots of a results directory")  # fmt: skip
    p_report.add_argument("results_dir", type=Path, help="a directory written by `kvsqueeze bench`")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, with the defaults that depend on other options filled in (generate's --compare)."""
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        if args.compare is None:
            args.compare = args.example
        if args.load_cache is None:  # with --load-cache they stay None: given, they are refused (cmd_generate)
            for name, value in GENERATE_DEFAULTS.items():
                if getattr(args, name) is None:
                    setattr(args, name, value)
    return args


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


def check_input_file(what: str, path: Path) -> None:
    """A file the user named to read: FileNotFoundError when it is not there, ValueError when it is a directory."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")


def check_output_file(what: str, path: Path) -> None:
    """A file the user named to write, checked before any work: not a directory, its folder creatable and writable."""
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be written: {str(folder)!r} is a file, not a directory")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} cannot be written: the directory {str(folder)!r} is not writable")


def read_text_file(what: str, path: Path) -> str:
    """The UTF-8 text of a file the user named; every way it cannot be read is one error naming the file."""
    check_input_file(what, path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {err.strerror}") from None
    if not text.strip():
        raise ValueError(f"{what} {str(path)!r} is empty")
    return text


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
_COMPRESSION_ONLY = ("method", "ratio", "option", "budget_policy", "chunk_size", "save_cache", "kv_bits")


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


def cmd_generate(args: argparse.Namespace) -> int:
    from kvsqueeze.pipeline import generate

    if args.load_cache:
        _refuse_with_load_cache(args)
        return _answer_saved(args)
    context, questions, prefix = _generate_inputs(args)
    method = _generate_method(args)
    sampling = _sampling(args)
    quantization = _quantization(args)
    if args.save_cache:
        check_output_file("--save-cache", args.save_cache)
    model, tokenizer = _load(args)

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


def cmd_calibrate(args: argparse.Namespace) -> int:
    import time

    from kvsqueeze.calibration import read_info
    from kvsqueeze.methods import get_method

    method = get_method(args.method, **dict(args.option))
    model, tokenizer = _load(args)
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
    if path.is_file():
        print(f"artifact: {path}")
    else:  # a read-only calibration folder: computed and used in memory, the store warned why it could not save
        print(f"artifact: not saved (could not write {path}; set KVSQUEEZE_CALIBRATION_DIR to a writable folder)")
    return 0


def _answer_saved(args: argparse.Namespace) -> int:
    from kvsqueeze.pipeline import answer_saved

    if not args.question:
        raise ValueError("give at least one --question")
    check_input_file("cache file", args.load_cache)
    sampling = _sampling(args)
    model, tokenizer = _load(args)
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


def _bench_config(args: argparse.Namespace) -> Any:
    from kvsqueeze.bench.runner import default_config

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

    from kvsqueeze.bench.runner import SUITES

    if config.name in SUITES and config.max_new_tokens is None:
        return Path("results") / "bench" / config.name
    quant_axis = ("kv_bits", "kv_group_size", "kv_residual")  # left out: see _quant_axis
    grid = {k: v for k, v in dataclasses.asdict(config).items() if k not in quant_axis}
    doc = json.dumps([grid, model], sort_keys=True, default=str)
    return Path("results") / "bench" / f"custom-{hashlib.sha1(doc.encode()).hexdigest()[:8]}"


def _print_tables(summary: Any) -> None:
    from kvsqueeze.bench.report import markdown_table, tables

    for title, header, rows in tables(summary)[:2]:
        print(f"\n{title}\n\n{markdown_table(header, rows)}")


def _report(results_dir: Path) -> None:
    from kvsqueeze.bench.report import write_report

    files = write_report(results_dir)
    _print_tables(files.summary)
    if files.plots_skipped:
        logger.warning("Plots skipped: %s", files.plots_skipped)
    logger.info("Report: %s and %s", files.markdown, files.html)


def cmd_bench(args: argparse.Namespace) -> int:
    from kvsqueeze.bench.folder import check_settings, settings_identity
    from kvsqueeze.bench.results import RESULTS
    from kvsqueeze.bench.runner import BenchInterrupted, run_bench
    from kvsqueeze.loading import DEFAULT_MODEL

    config = _bench_config(args)  # bad names, values and dataset files fail here, before the model loads
    model_name = args.model or DEFAULT_MODEL
    out = args.out or _default_out(config, model_name)
    if not args.new_run:  # a folder of another run is refused now; the model's own fields are checked once loaded
        check_settings(out, settings_identity(config, model_name, args.dtype, args.attn))
    model, tokenizer = _load(args)
    logger.info("Running the %s suite into %s ...", config.name, out)
    progress = not args.no_progress and args.log_level <= logging.INFO
    try:
        run = run_bench(model, tokenizer, config, out, model_name=model_name, progress=progress, new_run=args.new_run)
    except BenchInterrupted as err:
        print(f"kvsqueeze: interrupted; finished rows are in {err.run.out_dir / RESULTS}: rerun the same command to "
              "resume.", file=sys.stderr)  # fmt: skip
        return 130
    except KeyboardInterrupt:
        print("kvsqueeze: interrupted before any row was computed.", file=sys.stderr)
        return 130
    logger.info("%d rows computed, %d already there.", run.computed_rows, run.skipped_rows)
    _report(run.out_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if not args.results_dir.exists():
        raise FileNotFoundError(f"results directory {str(args.results_dir)!r} does not exist")
    if not args.results_dir.is_dir():
        raise ValueError(f"{str(args.results_dir)!r} is a file; give the results directory `kvsqueeze bench` wrote")
    _report(args.results_dir)
    return 0


SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def _serve_settings(args: argparse.Namespace) -> Any:
    """The server's settings from the command line, checked (with the default method) before the model loads."""
    from kvsqueeze.loading import DEFAULT_MODEL
    from kvsqueeze.serve.compression import Compression
    from kvsqueeze.serve.settings import ServerSettings

    options = dict(args.option)
    if "ratio" in options:
        raise ValueError(f"give the ratio with --ratio, not --option ratio={options['ratio']}")
    Compression(args.method, args.ratio, options, args.budget_policy).build()
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise ValueError(f"--cache-dir {str(args.cache_dir)!r} is a file, not a directory")
    key = args.api_key if args.api_key is not None else os.environ.get("KVSQUEEZE_API_KEY") or None
    return ServerSettings(
        model_name=args.model or DEFAULT_MODEL, host=args.host, port=args.port, method=args.method, ratio=args.ratio,
        options=options, budget_policy=args.budget_policy, api_key=key, max_cache_bytes=args.max_cache_bytes,
        cache_dir=args.cache_dir, max_tokens_limit=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f'kvsqueeze serve needs {", ".join(missing)}: pip install "kvsqueeze[serve]"')
    settings = _serve_settings(args)
    model, tokenizer = _load(args)
    from kvsqueeze.serve.server import serve

    levels = {logging.DEBUG: "debug", logging.INFO: "info"}
    serve(model, tokenizer, settings, log_level=levels.get(args.log_level, "warning"))
    return 0


class _CliHandler(logging.StreamHandler):
    """The stderr handler `main` puts on the `kvsqueeze` logger (replaced, not stacked, when main runs again). It
    writes to sys.stderr as it is when a message comes, so a later redirection of stderr is followed."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ sets it; the current sys.stderr always wins
        pass


def configure_logging(level: int) -> None:
    """Send the `kvsqueeze` logger's messages at `level` and above to stderr, as bare lines. The root logger and
    other libraries' loggers are left alone (a root logger at DEBUG floods stderr with e.g. matplotlib's)."""
    for handler in [h for h in logger.handlers if isinstance(h, _CliHandler)]:
        logger.removeHandler(handler)
    handler = _CliHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


COMMANDS = {"list": cmd_list, "generate": cmd_generate, "calibrate": cmd_calibrate, "bench": cmd_bench,
            "report": cmd_report, "serve": cmd_serve}  # fmt: skip


# What each command imports, loaded up front while Ctrl-C ends the process at once (see `_startup`): torch and
# transformers do not survive a KeyboardInterrupt in the middle of their import (it surfaces as a RecursionError
# or a ModuleNotFoundError, with a traceback). A module left out is still imported by the command, only without
# that protection.
COMMAND_MODULES = {
    "list": ["kvsqueeze.methods"],
    "generate": [
        "torch",
        "transformers",
        "kvsqueeze.pipeline",
        "kvsqueeze.generation",
        "kvsqueeze.loading",
        "kvsqueeze.cachefile",
    ],
    "calibrate": ["torch", "transformers", "kvsqueeze.calibration", "kvsqueeze.loading"],
    "bench": ["torch", "transformers", "kvsqueeze.bench.runner", "kvsqueeze.bench.report", "kvsqueeze.loading"],
    "report": ["kvsqueeze.bench.report"],
    # not the serve modules: they import the optional `serve` extra, whose absence cmd_serve reports in one line
    "serve": ["torch", "transformers", "kvsqueeze.pipeline", "kvsqueeze.loading", "kvsqueeze.cachefile"],
}


def _exit_interrupted(signum: int, frame: object) -> None:
    sys.stdout.flush()
    print("kvsqueeze: interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # nothing has been done yet: no file to finish, no lock to release


@contextmanager
def _startup() -> Iterator[None]:
    """While the command line is read and the heavy modules load, Ctrl-C ends the process at once with one line and
    status 130 (a KeyboardInterrupt raised inside an import leaves torch half-initialised). Outside the main thread
    (signal handlers cannot be set there) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    with _startup():
        args = parse_args(argv)
        configure_logging(args.log_level)
        logger.debug("kvsqueeze %s: %s", __version__, vars(args))
        for module in COMMAND_MODULES[args.command]:
            importlib.import_module(module)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C: one line, and the status a shell gives a command SIGINT ended
        print("kvsqueeze: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:  # the library's user errors: bad input, a path that is not there
        print(f"kvsqueeze: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name is not None:  # raised by an import statement: a broken install or a bug, keep the traceback
            raise
        print(f"kvsqueeze: error: {err}", file=sys.stderr)  # kvsqueeze's own: an optional package to install
        return 1
