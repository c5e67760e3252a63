"""`kvsqueeze generate --decode-target N --decode-every K`: decoding-time compression from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.cli import main
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _run(model_dir: Path, doc: Path, extra: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    argv = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "What is the code?"]
    assert main([*argv, "--max-new-tokens", "12", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_decode_target_flags(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. " * 6 + "The code is 4417. " + "Gulls circled. " * 5)
    plain = _run(model_dir, doc, [], capsys)
    large = _run(model_dir, doc, ["--decode-target", "5000", "--decode-every", "4"], capsys)
    assert large["answers"] == plain["answers"]  # a target above the total length changes nothing
    small = _run(model_dir, doc, ["--decode-target", "8", "--decode-every", "2"], capsys)
    assert small["answers"] != plain["answers"]
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "q",
              "--decode-target", "0"])  # fmt: skip
    assert "--decode-target: expected a positive integer, got 0" in capsys.readouterr().err
