"""Errors: the user's mistakes (ValueError: bad input; FileNotFoundError: a path they named) exit 2 with one line; a
package kvsqueeze asks to install exits 1 with one line; anything else raised inside the library is a bug and keeps
its traceback (it is not turned into a usage error)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from torch import Tensor

from kvsqueeze.cli import main
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import METHODS
from tests.cli.run_cli import run_cli_without


class Broken:
    """What FakeBroken raises when it scores a layer."""

    error: Exception = TypeError("a bug in a method")


@dataclass
class FakeBroken(ScorerMethod):
    """A method with a bug: scoring raises (never registered globally: the test adds it with monkeypatch)."""

    name: ClassVar[str] = "fake_broken"

    def score(self, ctx: ScoreContext) -> Tensor:
        raise Broken.error


def _doc(tmp_path: Path) -> Path:
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. " * 8 + "The code is 4417.")
    return doc


@pytest.mark.parametrize("error", [TypeError("a bug in a method"), PermissionError(13, "cannot write here")])
def test_a_bug_inside_the_library_propagates(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    monkeypatch.setitem(METHODS._entries, "fake_broken", FakeBroken)
    monkeypatch.setattr(Broken, "error", error)
    argv = ["generate", "--model", str(model_dir), "--context-file", str(_doc(tmp_path)), "--question", "Code?",
            "--method", "fake_broken", "--max-new-tokens", "2"]  # fmt: skip
    with pytest.raises(type(error)) as raised:  # not swallowed into "exit 2": the traceback reaches the user
        main(argv)
    assert raised.value is error


def test_a_model_directory_that_is_not_there_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--context-file", str(_doc(tmp_path)), "-q",
            "--question", "Code?"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsqueeze: error: model ") and "no-model" in err and "not found" in err
    assert len(err.strip().splitlines()) == 1


def test_a_model_name_not_found_lists_the_short_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", "gemma3", "--context-file", str(_doc(tmp_path)), "-q", "--question", "Code?"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model 'gemma3' not found" in err and "Did you mean 'gemma3-270m'?" in err
    assert "Known short names: smollm2-135m-instruct, gemma3-270m." in err and len(err.strip().splitlines()) == 1


def test_missing_files_the_user_named_exit_2(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", "--load-cache", str(tmp_path / "none.safetensors"), "--question", "q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--context-file", str(tmp_path / "none.txt"), "--question", "q"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_package_to_install_exits_1_with_the_command(model_dir: Path, tmp_path: Path) -> None:
    """A .parquet dataset without pyarrow: kvsqueeze says what to install, in one line (no traceback)."""
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    argv = ["bench", "--model", str(model_dir), "--dataset", str(tmp_path / "d.parquet"), "--methods", "none",
            "--out", str(tmp_path / "out"), "--no-progress", "-q"]  # fmt: skip
    done = run_cli_without("pyarrow.parquet", argv, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (  # after transformers' weight-loading progress bar
        "kvsqueeze: error: reading .parquet files needs pyarrow: pip install 'kvsqueeze[parquet]' (or pip install "
        "pyarrow)"
    )


def test_a_ratio_given_as_an_option_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--ratio/--ratios set the ratio; the same as an --option is refused before any model loads (it was a TypeError
    from inside the method's constructor)."""
    argv = ["generate", "--context-file", str(_doc(tmp_path)), "--question", "q", "--option", "ratio=0.3"]
    assert main(argv) == 2
    assert "give the ratio with --ratio, not --option ratio=0.3" in capsys.readouterr().err
    assert main(["bench", "--methods", "knorm", "--option", "knorm.ratio=0.3", "--out", str(tmp_path)]) == 2
    assert "give ratios with --ratios, not --option knorm.ratio=0.3" in capsys.readouterr().err
