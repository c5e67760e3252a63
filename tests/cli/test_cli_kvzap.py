"""`kvsqueeze calibrate kvzap_linear` prints the held-out Spearman correlation of the trained predictor."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.cli import main


def test_calibrate_prints_heldout_spearman(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["calibrate", "kvzap_linear", "--model", str(model_dir)]
    for option in ("n_docs=3", "doc_tokens=40", "heldout_docs=1"):
        argv += ["--option", option]
    assert main(argv) == 0
    out = capsys.readouterr().out
    mean = float(out.split("heldout_spearman_mean: ")[1].split()[0])
    assert -1.0 <= mean <= 1.0
    assert "heldout_spearman_per_layer: {" in out


def test_calibrate_bad_option_names_the_value(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "kvzap_mlp", "--model", str(model_dir), "--option", "width=0"]) == 2
    assert "width must be an integer in [1, 65536], got 0" in capsys.readouterr().err
