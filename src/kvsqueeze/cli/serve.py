"""`kvsqueeze serve`: the OpenAI-compatible server (the optional `serve` extra)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from kvsqueeze.cli.arguments import (
    GENERATE_DEFAULTS,
    OPTION_HELP,
    add_parser,
    budget_policies,
    load_from_args,
    parse_option,
    positive,
    ratio,
)

EXAMPLES = """examples:
  kvsqueeze serve                    the embedded model at http://127.0.0.1:8000/v1, knorm at ratio 0.5
  kvsqueeze serve --method expected_attention --ratio 0.75 --cache-dir contexts --max-cache-bytes 4GiB
  kvsqueeze serve --host 0.0.0.0 --port 9000 --api-key s3cret --max-tokens-limit 512"""
# not the serve modules: they import the optional `serve` extra, whose absence `run` reports in one line
IMPORTS = ["torch", "transformers", "kvsqueeze.pipeline", "kvsqueeze.loading", "kvsqueeze.cachefile"]


def _size(text: str) -> int:
    from kvsqueeze.serve.settings import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = add_parser(
        sub,
        "serve",
        parents,
        EXAMPLES,
        help="an OpenAI-compatible server that compresses each context once and reuses it",
        description="Serve the model over HTTP with OpenAI's API (chat and completions, streaming or not). A long\n"
        "context (a document uploaded to /v1/contexts, or the messages before the last user message) is prefilled\n"
        'and compressed once, then reused by every request over it. Needs: pip install "kvsqueeze[serve]"',
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--method", default=GENERATE_DEFAULTS["method"], help="default compression method ('none' = off)")
    p.add_argument("--ratio", type=ratio, default=GENERATE_DEFAULTS["ratio"], help="default compression ratio")
    p.add_argument("--option", action="append", default=[], type=parse_option, help=OPTION_HELP)
    p.add_argument("--budget-policy", choices=budget_policies(), default=None, help="wrap --method in a budget policy")
    p.add_argument("--kv-bits", type=int, default=None, help="default: contexts' kept keys/values in 8, 4 or 2 bits")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: the "
                   "KVSQUEEZE_API_KEY environment variable; unset: no key)")  # fmt: skip
    p.add_argument("--max-cache-bytes", type=_size, default="2GiB", help="bytes of compressed contexts kept in "
                   "memory (measured from their storages); least recently used dropped first")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=None, help="also keep compressed contexts in this folder, "
                   "so a restarted server reuses them")  # fmt: skip
    p.add_argument("--max-tokens-limit", type=positive, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=positive, default=None,
                   help="most context + question tokens of one request (default: the model's positions)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=_size, default="16MiB", help="largest request body")
    p.add_argument("--max-queue", type=positive, default=64, help="requests waiting for the model (more: 503)")
    p.add_argument("--max-batch", type=positive, default=8, help="requests decoded together (running rows)")


SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def _serve_settings(args: argparse.Namespace) -> Any:
    """The server's settings from the command line, checked (with the default method) before the model loads."""
    from kvsqueeze.loading import DEFAULT_MODEL
    from kvsqueeze.serve.compression import Compression
    from kvsqueeze.serve.settings import ServerSettings

    options = dict(args.option)
    if "ratio" in options:
        raise ValueError(f"give the ratio with --ratio, not --option ratio={options['ratio']}")
    Compression(args.method, args.ratio, options, args.budget_policy, args.kv_bits).build()
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise ValueError(f"--cache-dir {str(args.cache_dir)!r} is a file, not a directory")
    key = args.api_key if args.api_key is not None else os.environ.get("KVSQUEEZE_API_KEY") or None
    return ServerSettings(
        model_name=args.model or DEFAULT_MODEL, host=args.host, port=args.port, method=args.method, ratio=args.ratio,
        options=options, budget_policy=args.budget_policy, kv_bits=args.kv_bits, api_key=key,
        max_cache_bytes=args.max_cache_bytes, cache_dir=args.cache_dir, max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
        max_batch=args.max_batch,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f'kvsqueeze serve needs {", ".join(missing)}: pip install "kvsqueeze[serve]"')
    settings = _serve_settings(args)
    model, tokenizer = load_from_args(args)
    from kvsqueeze.serve.server import serve

    levels = {logging.DEBUG: "debug", logging.INFO: "info"}
    serve(model, tokenizer, settings, log_level=levels.get(args.log_level, "warning"))
    return 0
