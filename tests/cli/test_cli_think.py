"""ThinK on the command line: listed, options parsed (a scorer by name, the key channel ratio), bad ones exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.cli import main


def test_think_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    think = next(m for m in json.loads(capsys.readouterr().out) if m["name"] == "think")
    assert think["options"] == {"ratio": 0.0, "key_channel_ratio": 0.4, "window": 32, "scorer": None}
    assert main(["list"]) == 0
    assert "think" in capsys.readouterr().out


def test_generate_with_think_and_a_scorer(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. " * 12 + "The code is 4417. " + "Gulls circled. " * 10)
    argv = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "What is the code?",
            "--method", "think", "--ratio", "0.5", "--option", "scorer=snapkv", "--option", "key_channel_ratio=0.5",
            "--option", "window=8", "--max-new-tokens", "3", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert "scorer=SnapKV(ratio=0.5" in out["method"]
    stats = out["stats"]
    # half the tokens, each with 3/4 of its bytes (keys at half width): at most 3/8 of the bytes, plus rounding
    assert stats["kv_bytes_after"] <= stats["kv_bytes_before"] * 3 / 8 + 4 * 2 * 24 * 4


def test_think_ratio_without_scorer_exits_2(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("some text")
    argv = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "q", "--method", "think",
            "--ratio", "0.5"]  # fmt: skip
    assert main(argv) == 2
    assert "no scorer" in capsys.readouterr().err
