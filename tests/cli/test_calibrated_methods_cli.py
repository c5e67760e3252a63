"""The calibrated methods from the command line: `kvsqueeze list` marks them as needing calibration, `kvsqueeze
calibrate` computes once (progress on stderr) and loads afterwards, options (a fixed streaming fraction, LU-KV's scorer
by name) pass through, and bad options exit 2 naming the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.cli import main
from tests.tiny import save_tiny

NAMES = ("duo_attention", "lukv", "expected_attention_calibrated")
SMALL = ["--option", "n_tokens=128", "--option", "calibration_chunk=64"]
PROGRESS = {"duo_attention": "DuoAttention:", "lukv": "LU-KV:", "expected_attention_calibrated": "EA statistics:"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


def test_list_marks_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name in NAMES:
        assert lines[name].endswith("[needs: calibration]")


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("duo_attention", ["--option", "window=16", "--option", "streaming_fraction=0.5"]),
        ("lukv", ["--option", "scorer=knorm", "--option", "horizon=16"]),
        ("expected_attention_calibrated", []),
    ],
)
def test_calibrate_once_then_cached(name, extra, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["calibrate", name, "--model", str(model_dir), *SMALL, *extra]
    assert main(argv) == 0
    first = capsys.readouterr()
    path = Path(first.out.split("artifact: ")[1].strip())
    assert path.exists() and PROGRESS[name] in first.err  # computed, progress on stderr
    assert main(argv) == 0
    second = capsys.readouterr()
    assert f"artifact: {path}" in second.out and PROGRESS[name] not in second.err  # loaded


@pytest.mark.parametrize(
    ("name", "option", "message"),
    [
        ("duo_attention", "streaming_fraction=2", "streaming_fraction must be a number in [0, 1] or None, got 2"),
        ("duo_attention", "window=-3", "window must be an integer in [0, 1000000], got -3"),
        ("lukv", "grid=0", "grid must be an integer in [1, 4096], got 0"),
        ("expected_attention_calibrated", "seed=-1", "seed must be an integer in [0, 2147483647], got -1"),
    ],
)
def test_bad_option(name, option, message, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", name, "--model", str(model_dir), "--option", option]) == 2
    assert message in capsys.readouterr().err
