"""The command line: --json output is exactly one parseable document; bad input exits 2 with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.cli import main


def test_list_json_is_one_array_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    methods = json.loads(capsys.readouterr().out)
    names = {m["name"] for m in methods}
    assert {"knorm", "random", "streaming_llm", "pyramidkv", "snapkv"} <= names
    for m in methods:
        assert set(m) == {"name", "description", "options", "needs", "budget_scope", "budget_kind"}
        assert m["description"] and "ratio" in m["options"]
        assert m["budget_scope"] in ("head", "layer", "model") and m["budget_kind"] in ("uniform", "adaptive")
    kinds = {m["name"]: m["budget_kind"] for m in methods}
    assert kinds["knorm"] == "uniform" and kinds["simlayerkv"] == "adaptive"


def test_list_human(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    assert "knorm" in capsys.readouterr().out


def test_generate_json(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. " * 12 + "The code is 4417. " + "Gulls circled. " * 10)
    argv = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "What is the code?"]
    argv += ["--question", "Who circled?", "--method", "knorm", "--ratio", "0.5", "--max-new-tokens", "4", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # stdout is exactly one JSON document
    assert len(out["answers"]) == 2
    stats = out["stats"]
    for key in ("tokens_before", "tokens_after", "kv_bytes_before", "kv_bytes_after", "prefill_seconds",
                "compression_seconds", "decode_tokens_per_second", "kept_tokens_per_layer"):  # fmt: skip
        assert key in stats
    assert stats["kv_bytes_after"] < stats["kv_bytes_before"]
    assert "Loading" in captured.err  # logs went to stderr


def test_generate_needs_a_question(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("some text")
    assert main(["generate", "--model", str(model_dir), "--context-file", str(doc)]) == 2
    assert "--question" in capsys.readouterr().err


def test_missing_context_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", "--context-file", str(tmp_path / "nope.txt"), "--question", "q"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_method_suggests(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    assert main(["generate", "--context-file", str(doc), "--question", "q", "--method", "knrom"]) == 2
    assert "Did you mean 'knorm'" in capsys.readouterr().err


@pytest.mark.parametrize("ratio", ["1", "-0.2", "abc"])
def test_bad_ratio_is_rejected(ratio: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["generate", "--example", "--ratio", ratio])
    assert err.value.code == 2
    assert "ratio must be" in capsys.readouterr().err


def test_calibrate_once_then_cached(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "calibrate",
        "qfilters",
        "--model",
        str(model_dir),
        "--option",
        "n_tokens=128",
        "--option",
        "calibration_chunk=64",
    ]
    assert main(argv) == 0
    first = capsys.readouterr()
    path = Path(first.out.split("artifact: ")[1].strip())
    assert path.exists() and path.with_suffix(".json").exists()
    assert "n_tokens=128" in first.out and "calibration took" in first.out
    assert "Q-Filters:" in first.err  # computed: its progress bar went to stderr
    assert main(argv) == 0
    second = capsys.readouterr()
    assert f"artifact: {path}" in second.out
    assert "Q-Filters:" not in second.err  # loaded from the cache
    assert main([*argv, "--force"]) == 0
    assert "Q-Filters:" in capsys.readouterr().err


def test_calibrate_a_method_without_calibration(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "knorm", "--model", str(model_dir)]) == 0
    assert "knorm needs no calibration" in capsys.readouterr().out


def test_calibrate_bad_option(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "qfilters", "--model", str(model_dir), "--option", "n_tokens=3"]) == 2
    assert "n_tokens must be an integer in [16, 1000000], got 3" in capsys.readouterr().err
