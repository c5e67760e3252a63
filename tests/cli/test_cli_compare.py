"""`generate --compare`: the answers from the compressed cache next to those from the full cache, with the KV bytes
of each; on by default with --example (the first command a user runs), off with --no-compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.cli import main, parse_args
from tests.tiny import tiny_model, tiny_tokenizer

DOC = "The harbour was quiet in the morning. " * 12 + "The code is 4417. " + "Gulls circled. " * 10


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with room for the bundled example (about 4,700 tokens of the tiny tokenizer)."""
    directory = tmp_path_factory.mktemp("tiny-llama-8k")
    tiny_model("llama", max_position_embeddings=8192).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _doc(tmp_path: Path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


@pytest.mark.parametrize(
    ("argv", "compare"),
    [
        (["generate", "--example"], True),
        (["generate", "--example", "--no-compare"], False),
        (["generate", "--context-file", "d.txt", "--question", "q"], False),
        (["generate", "--context-file", "d.txt", "--question", "q", "--compare"], True),
    ],
)
def test_compare_is_on_by_default_with_the_example_only(argv: list[str], compare: bool) -> None:
    assert parse_args(argv).compare is compare


def test_compare_prints_both_answers_and_their_kv_bytes(model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["generate", "--model", str(model_dir), "--context-file", str(_doc(tmp_path)), "--question", "Code?",
            "--question", "Who circled?", "--max-new-tokens", "3", "--compare"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Each question answered twice by the same model") and "KNorm(ratio=0.5" in lines[0]
    assert [line for line in lines if line.startswith("Q: ")] == ["Q: Code?", "Q: Who circled?"]
    full = [line for line in lines if line.startswith("  uncompressed (")]
    kept = [line for line in lines if line.startswith("  compressed   (")]
    assert len(full) == len(kept) == 2 and all("KV)  A: " in line for line in full + kept)
    full_mib, kept_mib = (float(line.split("(")[1].split(" MiB")[0]) for line in (full[0], kept[0]))
    assert kept_mib < full_mib


def test_compare_in_json(model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["generate", "--model", str(model_dir), "--context-file", str(_doc(tmp_path)), "--question", "Code?",
            "--max-new-tokens", "3", "--compare", "--json"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    full, compressed = doc["uncompressed"]["stats"], doc["stats"]
    assert len(doc["uncompressed"]["answers"]) == len(doc["answers"]) == 1
    assert full["kv_bytes_after"] == full["kv_bytes_before"] == compressed["kv_bytes_before"]  # nothing removed
    assert compressed["kv_bytes_after"] < full["kv_bytes_after"]


def test_compare_needs_the_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--load-cache", str(tmp_path / "c.safetensors"), "--question", "q", "--compare"]
    assert main(argv) == 2
    assert "--compare needs the context itself" in capsys.readouterr().err


def test_the_example_compares_by_default(long_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--example", "--model", str(long_model_dir), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Each question answered twice")
    assert "Q: What is the secret access code for the archive?" in out
    assert "  uncompressed (" in out and "  compressed   (" in out
    assert "The secret access code for the archive is" in out  # the example's answer prefix
    assert main(["generate", "--example", "--model", str(long_model_dir), "--max-new-tokens", "2", "--no-compare"]) == 0
    single = capsys.readouterr().out
    assert single.startswith("method: KNorm(") and "uncompressed (" not in single
