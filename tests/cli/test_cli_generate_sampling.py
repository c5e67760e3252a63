"""`kvsqueeze generate` with sampling: --temperature/--top-p/--seed/--stop reach the decode loop, bad values are
refused before any model loads, a seed gives the same answers twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.cli import main


def _run(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. The code is 4417. " * 4)
    argv = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "What is the code?",
            "--max-new-tokens", "8", "--json", *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_a_seed_gives_the_same_sampled_answers(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    hot = ("--temperature", "1.5", "--seed", "3")
    first, second = _run(model_dir, tmp_path, capsys, *hot), _run(model_dir, tmp_path, capsys, *hot)
    assert first["answers"] == second["answers"]
    others = {_run(model_dir, tmp_path, capsys, "--temperature", "1.5", "--seed", str(s))["answers"][0]
              for s in range(4, 9)}  # fmt: skip
    assert len(others | {first["answers"][0]}) > 1  # other seeds, other answers (a random model at 1.5)


def test_a_stop_string_cuts_the_answer(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    free = _run(model_dir, tmp_path, capsys)["answers"][0]
    assert len(free) > 4, free
    stop = free[2:4]
    cut = _run(model_dir, tmp_path, capsys, "--stop", stop)["answers"][0]
    assert cut == free[: free.find(stop)].strip()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--temperature", "-1"], "temperature must be a number in [0, 100] (0 = greedy), got -1.0"),
        (["--top-p", "0"], "top_p must be a number in (0, 1], got 0.0"),
        (["--seed", "-5"], "seed must be an integer in [0, 9223372036854775807] or None, got -5"),
        (["--stop", ""], "stop must be a string or a list of non-empty strings, got ['']"),
    ],
)
def test_bad_sampling_values_are_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--context-file", str(doc), "--question", "q", *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"kvsqueeze: error: {message}"


def test_kv_bits_quantizes_and_the_summary_says_so(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = _run(model_dir, tmp_path, capsys, "--kv-bits", "4", "--kv-residual", "8")
    assert out["stats"]["kv_bits"] == 4 and out["stats"]["kv_bytes_after"] < out["stats"]["kv_bytes_before"] / 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kv-bits", "3"], "kv_bits must be one of 2, 4, 8, got 3"),
        (["--kv-bits", "4", "--kv-group-size", "0"], "kv_group_size must be an integer >= 1"),
    ],
)
def test_bad_kv_bits_are_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--context-file", str(doc), "--question", "q", *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().startswith(f"kvsqueeze: error: {message}")


def test_kv_bits_cannot_go_with_load_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    saved = tmp_path / "doc.safetensors"
    saved.write_bytes(b"x")
    assert main(["generate", "--load-cache", str(saved), "--question", "q", "--kv-bits", "4"]) == 2
    assert "--kv-bits cannot go with --load-cache" in capsys.readouterr().err
