"""`kvsqueeze tune` end to end on a tiny model, and its tune.json read back by `generate --config` and
`bench --config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.bench.results import RESULTS
from kvsqueeze.cli import main
from kvsqueeze.tuning import TUNE_FILE, TuneChoice, read_choice, write_choice

pytestmark = pytest.mark.usefixtures("fakes")


def _tune(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", "--model", str(model_dir), "--tasks", "fake", "--lengths", "48", "--samples", "4",
            "--methods", "knorm,tova", "--grid", "0.25,0.5,0.75", "--out", str(out), "--no-progress",
            *extra]  # fmt: skip


def test_tune_writes_tune_json_that_generate_and_bench_accept(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tune"
    assert main(_tune(model_dir, out)) == 0  # a random model scores 0: every ratio meets 0.95 x 0
    printed = capsys.readouterr().out
    assert "## Chosen" in printed and "model passes" in printed
    choice = read_choice(out / TUNE_FILE)
    assert choice.ratio == 0.75 and choice.method in ("knorm", "tova")
    for name in ("tune_report.md", "report.html", "tune_split.jsonl", "heldout_split.jsonl", RESULTS):
        assert (out / name).is_file(), name

    context = tmp_path / "doc.txt"
    context.write_text("The code is 1234. " * 10)
    gen = ["generate", "--model", str(model_dir), "--context-file", str(context), "--question", "What is the code?",
           "--max-new-tokens", "2", "--json", "--config", str(out / TUNE_FILE)]  # fmt: skip
    assert main(gen) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "ratio=0.75" in doc["method"]
    assert main([*gen, "--ratio", "0.25"]) == 0  # a flag wins over the file
    assert "ratio=0.25" in json.loads(capsys.readouterr().out)["method"]

    bench_out = tmp_path / "bench"
    bench = ["bench", "--model", str(model_dir), "--tasks", "fake", "--lengths", "40", "--samples", "1",
             "--config", str(out / TUNE_FILE), "--out", str(bench_out), "--no-progress"]  # fmt: skip
    assert main(bench) == 0
    rows = [json.loads(line) for line in (bench_out / RESULTS).read_text().splitlines()]
    assert {(r["method_name"], r["ratio"]) for r in rows} == {("none", 0.0), (choice.method, 0.75)}


def test_bad_config_and_bad_tune_values_exit_2(model_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "tune.json"
    bad.write_text(json.dumps({"kvsqueeze_tune": 1, "method": "nosuch", "ratio": 0.5}))
    assert main(["generate", "--model", str(model_dir), "--example", "--config", str(bad)]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert main(_tune(model_dir, tmp_path / "t", "--target", "1.5")) == 2
    assert "target" in capsys.readouterr().err


def test_generate_config_sets_budget_policy_and_bits(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = write_choice(TuneChoice("knorm", 0.5, {}, "adakv", 8), tmp_path / "tune.json")
    context = tmp_path / "doc.txt"
    context.write_text("Gulls circled over the old market. " * 8)
    assert main(["generate", "--model", str(model_dir), "--context-file", str(context), "--question", "Who?",
                 "--max-new-tokens", "2", "--json", "--config", str(path)]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert "adakv" in doc["method"].lower() and "ratio=0.5" in doc["method"]
    assert doc["stats"]["kv_bits"] == 8


def test_tune_ray_options_need_the_ray_executor(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(_tune(model_dir, tmp_path, "--actor-threads", "1")) == 2
    assert "--actor-threads only apply with --executor ray" in capsys.readouterr().err
    assert not (tmp_path / RESULTS).exists()


def test_a_chunk_size_in_the_config_reaches_bench(model_dir: Path, tmp_path: Path) -> None:
    path = write_choice(TuneChoice("knorm", 0.5, chunk_size=16), tmp_path / "tune.json")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(model_dir), "--tasks", "fake", "--lengths", "40", "--samples", "1",
                 "--config", str(path), "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert {r.get("chunk_size") for r in rows if r["method_name"] == "knorm"} == {16}


def test_chunk_sizes_flag(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(_tune(model_dir, tmp_path, "--methods", "knorm", "--chunk-sizes", "none,16")) == 0
    assert "knorm (chunks of 16)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        main(_tune(model_dir, tmp_path / "b", "--chunk-sizes", "none,zero"))
    assert bad.value.code == 2 and "expected a positive integer, got 'zero'" in capsys.readouterr().err
