"""The `kvsqueeze` command: its parser (one module per subcommand) and `main`, which runs a subcommand and turns the
library's user errors into one line and an exit status."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from kvsqueeze import __version__
from kvsqueeze.cli import bench, calibrate, generate, listing, report, serve, tune
from kvsqueeze.cli.arguments import HelpFormatter, logging_options, model_options
from kvsqueeze.cli.logs import configure_logging, logger

_MAIN_EXAMPLES = """examples:
  kvsqueeze generate --example       answer a question about a bundled document, with and without compression
  kvsqueeze list                     the compression methods and their options
  kvsqueeze bench                    the default benchmark suite; report in results/bench/default
  kvsqueeze bench -v                 the same, with debug messages (-v/-q go before or after the subcommand)
  kvsqueeze tune --dataset mine.jsonl  the most compression that keeps 95% of the score on your data (tune.json)
  kvsqueeze serve                    an OpenAI-compatible server at http://127.0.0.1:8000/v1
  kvsqueeze COMMAND --help           the options of one command, with their defaults and examples"""

# Each subcommand's module: `register(sub, parents)` adds its parser, `run(args)` runs it, `IMPORTS` lists what it
# imports, loaded up front while Ctrl-C ends the process at once (see `_startup`): torch and transformers do not
# survive a KeyboardInterrupt in the middle of their import (it surfaces as a RecursionError or a
# ModuleNotFoundError, with a traceback). A module left out is still imported by the command, only without that
# protection. `model`: whether the command loads a model (and so takes --model, --dtype, ...).
COMMANDS: dict[str, ModuleType] = {
    "list": listing,
    "generate": generate,
    "calibrate": calibrate,
    "bench": bench,
    "serve": serve,
    "report": report,
    "tune": tune,
}
LOADS_MODEL = {"generate", "calibrate", "bench", "serve", "tune"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsqueeze", description="KV cache compression for Hugging Face LMs.",
                                     parents=[logging_options(top=True)], formatter_class=HelpFormatter,
                                     epilog=_MAIN_EXAMPLES)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"kvsqueeze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    logs, model = logging_options(top=False), model_options()
    for name, module in COMMANDS.items():
        module.register(sub, [logs, model] if name in LOADS_MODEL else [logs])
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, with the defaults that depend on other options filled in (generate's --compare)."""
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        generate.fill_defaults(args)
    return args


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
        for module in COMMANDS[args.command].IMPORTS:
            importlib.import_module(module)
    try:
        return COMMANDS[args.command].run(args)
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
