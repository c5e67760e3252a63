"""Run the command line in a fresh interpreter, on this checkout's sources: for what only a real process shows (what
reaches stderr, exit statuses, imports blocked without touching the test process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def run_python(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python ARGS...` with PYTHONPATH set to the sources (e.g. "-m", "kvsqueeze", "list" or "-c", CODE)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def run_cli_without(module: str, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`kvsqueeze ARGV` in a process where importing `module` fails, as if it were not installed."""
    code = f"import sys; sys.modules[{module!r}] = None\nfrom kvsqueeze.cli import main\nsys.exit(main({argv!r}))"
    return run_python("-c", code, cwd=cwd)
