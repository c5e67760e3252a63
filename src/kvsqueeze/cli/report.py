"""`kvsqueeze report`: (re)write the report of a results directory; `bench` writes it the same way."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvsqueeze.cli.arguments import add_parser
from kvsqueeze.cli.logs import logger

EXAMPLES = """examples:
  kvsqueeze report results/bench/default"""
IMPORTS = ["kvsqueeze.bench.report"]


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = add_parser(
        sub, "report", parents, EXAMPLES, help="(re)write the Markdown/HTML report and plots of a results directory"
    )
    p.add_argument("results_dir", type=Path, help="a directory written by `kvsqueeze bench`")


def print_tables(summary: Any) -> None:
    from kvsqueeze.bench.report import markdown_table, tables

    for title, header, rows in tables(summary)[:2]:
        print(f"\n{title}\n\n{markdown_table(header, rows)}")


def write_and_print_report(results_dir: Path) -> None:
    from kvsqueeze.bench.report import write_report

    files = write_report(results_dir)
    print_tables(files.summary)
    if files.plots_skipped:
        logger.warning("Plots skipped: %s", files.plots_skipped)
    logger.info("Report: %s and %s", files.markdown, files.html)


def run(args: argparse.Namespace) -> int:
    if not args.results_dir.exists():
        raise FileNotFoundError(f"results directory {str(args.results_dir)!r} does not exist")
    if not args.results_dir.is_dir():
        raise ValueError(f"{str(args.results_dir)!r} is a file; give the results directory `kvsqueeze bench` wrote")
    write_and_print_report(args.results_dir)
    return 0
