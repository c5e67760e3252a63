"""`--config tune.json` for generate and bench: the configuration `kvsqueeze tune` chose, under the command line's
own flags (a flag given on the command line wins over the file)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CONFIG_HELP = (
    "a tune.json written by `kvsqueeze tune`: its method, ratio, options, budget policy, kv_bits and chunk size, each "
)
CONFIG_HELP += "overridden by the matching flag when given"


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)


def read_config(path: Path) -> Any:
    from kvsqueeze.tuning.config import read_choice

    return read_choice(path)


def apply_to_generate(args: argparse.Namespace) -> None:
    """Fill generate's --method, --ratio, --option, --budget-policy, --kv-bits and --chunk-size from --config where not
    given."""
    choice = read_config(args.config)
    same_method = args.method is None or args.method.strip().lower().replace("-", "_") == choice.method
    args.method = choice.method if args.method is None else args.method
    args.ratio = choice.ratio if args.ratio is None else args.ratio
    if same_method:  # the file's options belong to its method; flags given later win
        args.option = [*choice.options.items(), *args.option]
        args.budget_policy = args.budget_policy or choice.budget_policy
    args.kv_bits = choice.kv_bits if args.kv_bits is None else args.kv_bits
    args.chunk_size = choice.chunk_size if args.chunk_size is None else args.chunk_size


def apply_to_bench(args: argparse.Namespace) -> None:
    """Make bench's grid the uncompressed baseline and the file's method at its ratio, where flags do not say
    otherwise."""
    choice = read_config(args.config)
    args.methods = args.methods or ["none", choice.method]
    args.ratios = args.ratios or [choice.ratio]
    args.option = [*((choice.method, k, v) for k, v in choice.options.items()), *args.option]
    args.budget_policy = args.budget_policy or choice.budget_policy
    if args.kv_bits is None and choice.kv_bits is not None:
        args.kv_bits = [choice.kv_bits]
    args.chunk_size = choice.chunk_size if args.chunk_size is None else args.chunk_size
