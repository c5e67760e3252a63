"""`kvsqueeze calibrate`: calibrate a method on a model ahead of time (cached on disk)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from kvsqueeze.cli.arguments import OPTION_HELP, add_parser, load_from_args, parse_option

EXAMPLES = """examples:
  kvsqueeze calibrate qfilters
  kvsqueeze calibrate kvzap_mlp --force
  kvsqueeze calibrate qfilters --model path/to/model --option n_tokens=4096"""
IMPORTS = ["torch", "transformers", "kvsqueeze.calibration", "kvsqueeze.loading"]


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = add_parser(
        sub, "calibrate", parents, EXAMPLES, help="calibrate a method on a model ahead of time (cached on disk)"
    )
    p.add_argument("method", help="method name (see `kvsqueeze list`; those marked [needs: calibration])")
    p.add_argument("--option", action="append", default=[], type=parse_option, help=OPTION_HELP)
    p.add_argument("--force", action="store_true", help="compute again even if a cached artifact exists")


def run(args: argparse.Namespace) -> int:

    from kvsqueeze.calibration import read_info
    from kvsqueeze.methods import get_method

    method = get_method(args.method, **dict(args.option))
    model, tokenizer = load_from_args(args)
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
