"""`kvsqueeze generate --decode-target N --decode-every K`: decoding-time compression from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.cli import main
from tests.tiny import tiny_model, tiny_tokenizer


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


def test_save_cache_then_answer_from_it(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. " * 6 + "The code is 4417. " + "Gulls circled. " * 5)
    saved = tmp_path / "ctx.safetensors"
    first = _run(model_dir, doc, ["--method", "knorm", "--ratio", "0.5", "--save-cache", str(saved)], capsys)
    assert saved.is_file()
    argv = ["generate", "--model", str(model_dir), "--load-cache", str(saved), "--question", "What is the code?"]
    assert main([*argv, "--max-new-tokens", "12", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["answers"] == first["answers"]  # reused across processes: same answers as right after compressing
    assert again["method"] == "KNorm(ratio=0.5)" and again["seen"] == [first["stats"]["tokens_before"]]
    other = tmp_path / "other-model"
    tiny_model("llama", seed=5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    bad = ["generate", "--model", str(other), "--load-cache", str(saved), "--question", "q"]
    assert main(bad) == 2
    assert "fingerprint" in capsys.readouterr().err
