"""What a benchmark's results file says about its run: the machine it ran on and the options that reproduce it."""

from __future__ import annotations

import argparse
import platform

import torch


def machine() -> str:
    """The CPU architecture, torch's version and the threads torch runs with now (after the script set them)."""
    threads = torch.get_num_threads()
    return f"{platform.machine()}, torch {torch.__version__}, {threads} thread{'' if threads == 1 else 's'}"


def given_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The options given away from their defaults, as they are typed (" --kv-heads 8 ..."), for the recorded
    command."""
    return "".join(
        f" --{key.replace('_', '-')} {value}" for key, value in vars(args).items() if value != parser.get_default(key)
    )
