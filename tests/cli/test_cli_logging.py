"""Logging: the CLI configures the `kvsqueeze` logger only (never the root logger, so other libraries' debug output
stays off under -v); -v/-q work before and after the subcommand."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvsqueeze.cli import configure_logging, main, parse_args
from tests.cli.run_cli import run_python
from tests.unit.bench.report_rows import write_results


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["list"], logging.INFO),
        (["-v", "list"], logging.DEBUG),
        (["list", "-v"], logging.DEBUG),
        (["-q", "bench"], logging.WARNING),
        (["bench", "--quiet"], logging.WARNING),
        (["-q", "report", "x", "--verbose"], logging.DEBUG),  # the last word wins
        (["generate", "--example", "-q"], logging.WARNING),
    ],
)
def test_verbosity_before_or_after_the_subcommand(argv: list[str], level: int) -> None:
    assert parse_args(argv).log_level == level


def test_verbose_and_quiet_together_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        parse_args(["list", "-v", "-q"])
    assert err.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_configure_logging_touches_only_the_kvsqueeze_logger(capsys: pytest.CaptureFixture[str]) -> None:
    root, kvs = logging.getLogger(), logging.getLogger("kvsqueeze")
    before, handlers = (root.level, list(root.handlers)), list(kvs.handlers)
    try:
        configure_logging(logging.DEBUG)
        configure_logging(logging.DEBUG)  # again (main called twice): one handler of its own, not two
        assert (root.level, list(root.handlers)) == before
        assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.DEBUG)
        assert kvs.level == logging.DEBUG and len(set(kvs.handlers) - set(handlers)) == 1
        kvs.debug("a debug line")
        assert capsys.readouterr().err == "a debug line\n"
    finally:
        kvs.handlers = handlers
        kvs.setLevel(logging.NOTSET)


def test_verbose_report_shows_kvsqueeze_debug_but_not_matplotlib(tmp_path: Path) -> None:
    """`kvsqueeze report DIR -v` draws plots with matplotlib: its font manager logs at DEBUG, which must not reach
    stderr (it did when the root logger was set to DEBUG)."""
    out = write_results(tmp_path / "run")
    done = run_python("-m", "kvsqueeze", "report", str(out), "-v")
    assert done.returncode == 0, done.stderr
    assert "kvsqueeze 0.1" in done.stderr and "Report:" in done.stderr  # kvsqueeze's debug and info lines
    assert "findfont" not in done.stderr and "matplotlib" not in done.stderr.lower()
    quiet = run_python("-m", "kvsqueeze", "report", str(out), "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert "| knorm |" in quiet.stdout  # results still go to stdout


def test_quiet_still_shows_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    assert main(["generate", "--context-file", str(doc), "-q"]) == 2  # errors are not logs: always shown
    assert "give at least one --question" in capsys.readouterr().err
