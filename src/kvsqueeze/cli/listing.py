"""`kvsqueeze list`: the compression methods and their options."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvsqueeze.cli.arguments import add_parser

EXAMPLES = """examples:
  kvsqueeze list
  kvsqueeze list --json | python -m json.tool"""
IMPORTS = ["kvsqueeze.methods"]


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = add_parser(sub, "list", parents, EXAMPLES, help="list the compression methods")
    p.add_argument("--json", action="store_true", help="print one JSON array")


def run(args: argparse.Namespace) -> int:
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
