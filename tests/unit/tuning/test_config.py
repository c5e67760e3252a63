"""tune.json: round trip and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.tuning.config import TuneChoice, read_choice, write_choice


def test_round_trip(tmp_path: Path) -> None:
    choice = TuneChoice("knorm", 0.5, {}, "adakv", 4, {"target": 0.95}, chunk_size=512)
    back = read_choice(write_choice(choice, tmp_path / "tune.json"))
    assert back == choice and back.chunk_size == 512
    assert TuneChoice("KNorm", 0.5, kv_bits=16).kv_bits is None and TuneChoice("KNorm", 0.5).method == "knorm"


def bad(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kvsqueeze_tune": 1, "ratio": 0.5}, "missing field 'method'"),
        ({"kvsqueeze_tune": 1, "method": "knorm"}, "missing field 'ratio'"),
        ({"kvsqueeze_tune": 1, "method": "knorm", "ratio": 1.5}, "ratio"),
        ({"kvsqueeze_tune": 1, "method": "nosuch", "ratio": 0.5}, "unknown method 'nosuch'; known: .*knorm"),
        ({"kvsqueeze_tune": 1, "method": "knorm", "ratio": 0.5, "budget_policy": "x"}, "unknown budget policy 'x'"),
        ({"kvsqueeze_tune": 1, "method": "knorm", "ratio": 0.5, "kv_bits": 5}, "5"),
        ({"kvsqueeze_tune": 1, "method": "knorm", "ratio": 0.5, "extra": 1}, r"unknown fields \['extra'\]"),
        (
            {"kvsqueeze_tune": 1, "method": "knorm", "ratio": 0.5, "chunk_size": 0},
            "chunk_size must be an integer >= 1 or None",
        ),
        ({"method": "knorm", "ratio": 0.5}, "'kvsqueeze_tune' must be 1"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_choice(bad(tmp_path, data))


def test_missing_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_choice(tmp_path / "nope.json")
    (tmp_path / "t.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_choice(tmp_path / "t.json")
