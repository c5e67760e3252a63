"""`kvsqueeze bench --executor ray`: a tiny grid on 2 local Ray actors, resumed serially; Ray options need the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.bench.results import RESULTS
from kvsqueeze.cli import main


def _bench(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--model", str(model_dir), "--tasks", "passkey", "--lengths", "160", "--samples", "2",
            "--methods", "none,knorm", "--ratios", "0.5", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def test_ray_options_need_the_ray_executor(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(_bench(model_dir, tmp_path, "--actors", "2")) == 2
    assert "--actors only apply with --executor ray" in capsys.readouterr().err
    assert not (tmp_path / RESULTS).exists()


def test_bench_on_ray_then_resumed_serially(model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="kvsqueeze")
    assert main(_bench(model_dir, tmp_path, "--executor", "ray", "--actors", "2", "--actor-threads", "1")) == 0
    assert "Ray: 2 actor(s), 1 CPU thread(s) each" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / RESULTS).read_text().splitlines()]
    assert len(rows) == 2 * 2 and (tmp_path / "report.md").is_file()
    assert main(_bench(model_dir, tmp_path)) == 0  # the serial executor resumes the Ray run's folder
    assert "0 rows computed, 4 already there" in caplog.text
